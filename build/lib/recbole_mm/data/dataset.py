"""The feature hook: RecBole's SequentialDataset plus frozen per-item feature tables."""
from pathlib import Path

from recbole.data.dataset import SequentialDataset as RecBoleSequentialDataset
from recbole.utils import FeatureType

from recbole_mm.data.features import FeatureTableSpec, describe_missing, load_feature_table
from recbole_mm.utils import RecboleMMError


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

    @property
    def has_timestamps(self):
        return self.time_field is not None and self.time_field in self.field2type

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
