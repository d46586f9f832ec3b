"""The feature hook: RecBole's SequentialDataset plus frozen per-item feature tables."""
from pathlib import Path

import numpy as np
from recbole.data.dataset import SequentialDataset as RecBoleSequentialDataset
from recbole.utils import FeatureType

from recbole_mm.data.features import FeatureTableSpec, describe_missing, load_feature_table
from recbole_mm.utils import RecboleMMError


# Share of within-user steps equal to the most common (non-zero) step above which timestamps are taken for a
# row counter: real clocks never give one step for 90% of a dataset's consecutive interactions.
COUNTER_STEP_SHARE = 0.9


def counter_like_timestamps(users, times):
    """(is_counter, modal step, its share) for interactions given as parallel arrays.

    Counter-like: the most common step between a user's consecutive (time-sorted) interactions is
    positive and covers at least COUNTER_STEP_SHARE of all steps (LLMRank's LastFM: 99% are 1).
    """
    users, times = np.asarray(users), np.asarray(times, dtype=np.float64)
    order = np.lexsort((times, users))
    users, times = users[order], times[order]
    steps = np.diff(times)[users[1:] == users[:-1]]
    if len(steps) == 0:
        return False, None, 0.0
    values, counts = np.unique(steps, return_counts=True)
    modal = int(np.argmax(counts))
    share = float(counts[modal] / len(steps))
    return bool(values[modal] > 0 and share >= COUNTER_STEP_SHARE), float(values[modal]), share


class SequentialDataset(RecBoleSequentialDataset):
    """RecBole's SequentialDataset, except that pre-split (benchmark) histories longer than
    ``MAX_ITEM_LIST_LENGTH`` keep their most recent items. RecBole keeps them whole (models with
    position embeddings of that size then crash), and its ``seq_len`` option keeps the oldest."""

    def _benchmark_presets(self):
        max_length = self.config["MAX_ITEM_LIST_LENGTH"]
        for field in list(self.inter_feat):
            if field.endswith(self.config["LIST_SUFFIX"]) and self.field2type[field] in (
                FeatureType.TOKEN_SEQ, FeatureType.FLOAT_SEQ
            ):
                self.inter_feat[field] = self.inter_feat[field].map(lambda seq: seq[-max_length:])
                self.field2seqlen[field] = min(self.field2seqlen[field], max_length)
        super()._benchmark_presets()


class MultimodalSequentialDataset(SequentialDataset):
    """SequentialDataset whose items carry the feature tables named in ``config['modalities']``.

    The dataset yaml declares where each table lives (``feature_tables``); the run (model yaml,
    user config, command line) chooses which of them to load (``modalities``). After construction:

    - ``item_features[name]``: float32 tensor (n_items, D) in internal item-id order, row 0 zero;
    - ``item_feature_masks[name]``: bool tensor (n_items,), False for padding and missing items;
    - ``has_timestamps``: whether batches carry ``timestamp_list`` (normal mode with a time field).

    Works in RecBole's normal mode and in benchmark mode (pre-split files); split copies share
    the tables.
    """

    def __init__(self, config):
        super().__init__(config)
        self.item_features, self.item_feature_masks = {}, {}
        self._load_feature_tables()
        self._check_timestamps()

    @property
    def has_timestamps(self):
        """Time-aware models read real gaps only: ``timestamps_are_order: True`` (a dataset whose
        timestamps are a row counter, e.g. lastfm-llmrank) keeps the order and drops the time signal."""
        has_field = self.time_field is not None and self.time_field in self.field2type
        return has_field and not self.config["timestamps_are_order"]

    def _check_timestamps(self):
        """Warn when timestamps look like a row counter and the dataset does not say so."""
        if self.time_field is None or self.time_field not in self.inter_feat or self.config["timestamps_are_order"]:
            return
        is_counter, step, share = counter_like_timestamps(
            np.asarray(self.inter_feat[self.uid_field]), np.asarray(self.inter_feat[self.time_field])
        )
        if is_counter:
            self.logger.warning(
                f"dataset '{self.dataset_name}': {share:.0%} of the steps between a user's consecutive timestamps are "
                f"exactly {step:g}: the timestamps look like a row counter, not time. Time-aware models (MMM4Rec) "
                "would read them as real gaps; if they only give the order, set timestamps_are_order: True in "
                f"properties/dataset/{self.dataset_name}.yaml (or on the command line)."
            )

    def _load_feature_tables(self):
        declared = self.config["feature_tables"] or {}
        modalities = list(self.config["modalities"] or [])
        dataset_dir = Path(self.dataset_path)
        item2index_path = dataset_dir / f"{self.dataset_name}.item2index"
        for name in modalities:
            if name not in declared:
                raise RecboleMMError(
                    f"Modality '{name}' is requested (modalities: {modalities}) but dataset "
                    f"'{self.dataset_name}' declares feature tables only for {sorted(declared)}. Add "
                    f"feature_tables.{name} to properties/dataset/{self.dataset_name}.yaml or your config."
                )
            spec = FeatureTableSpec.from_config(name, declared[name], dataset_dir)
            table, mask, how = load_feature_table(spec, self.field2id_token[self.iid_field], item2index_path)
            self.item_features[name] = table
            self.item_feature_masks[name] = mask
            self.logger.info(
                f"feature table {spec.path.name} ({table.shape[1]}-d, {how}); {describe_missing(name, mask)}"
            )
