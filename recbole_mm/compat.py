"""Every workaround recbole-mm needs around RecBole 1.2.1 and its dependency stack, in one place.

recbole-mm runs on numpy 1 and 2 and on pandas 1.5 to 3 (the tested range is pinned in ``setup.cfg``).
This module must be imported before RecBole's ``Config`` is built (``recbole_mm/__init__.py`` does).
Never import ``recbole.quick_start`` or ``recbole.trainer.hyper_tuning``'s ray path: they import
ray at module level.
"""
import enum
import warnings

import numpy as np
import pandas as pd
import torch

# numpy 2 removed these numpy-1 names. RecBole 1.2.1's Config.compatibility_settings reads np.float_,
# np.complex_ and np.unicode_ (to re-add np.float, np.long, ... that its code uses) and ray 2.6's Tune
# reads np.bool8; each alias names the same type it named in numpy 1.
_NUMPY_1_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}
for _alias, _type in _NUMPY_1_ALIASES.items():
    if not hasattr(np, _alias):
        setattr(np, _alias, _type)

from recbole.data.dataset import Dataset  # noqa: E402  (after the aliases)
from recbole.utils import FeatureSource, FeatureType, set_color  # noqa: E402

# RecBole's chained fillna and groupby calls emit pandas FutureWarnings on every dataset load;
# they are harmless (the fillna sites are replaced below) and drown the training log.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")
# RecBole's trainer builds torch.cuda.amp.GradScaler, deprecated in torch >= 2.4 (behaviour unchanged).
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning)


# RecBole 1.2.1 fills missing values with chained ``feat[field].fillna(..., inplace=True)``. Under pandas
# copy-on-write (the only mode from pandas 3) that fills a temporary copy and leaves the frame untouched,
# so the two Dataset methods that do it are replaced by the same steps written as assignments.

def _fill_nan(self):
    """RecBole's ``Dataset._fill_nan``: token fields get 0 ([PAD]), float fields their mean, empty
    sequences an empty array."""
    self.logger.debug(set_color("Filling nan", "green"))
    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x)


def _load_feat(self, filepath, source):
    """RecBole's ``Dataset._load_feat``, line for line, except that an empty sequence cell is filled
    with "" by assignment (RecBole's chained fillna leaves the NaN, and ``str.split`` then fails on it)."""
    self.logger.debug(set_color(f"Loading feature from [{filepath}] (source: [{source}]).", "green"))

    load_col, unload_col = self._get_load_and_unload_col(source)
    if load_col == set():
        return None

    field_separator = self.config["field_separator"]
    columns = []
    usecols = []
    dtype = {}
    encoding = self.config["encoding"]
    with open(filepath, "r", encoding=encoding) as f:
        head = f.readline()[:-1]
    for field_type in head.split(field_separator):
        field, ftype = field_type.split(":")
        try:
            ftype = FeatureType(ftype)
        except ValueError:
            raise ValueError(f"Type {ftype} from field {field} is not supported.")
        if load_col is not None and field not in load_col:
            continue
        if unload_col is not None and field in unload_col:
            continue
        if isinstance(source, FeatureSource) or source != "link":
            self.field2source[field] = source
            self.field2type[field] = ftype
            if not ftype.value.endswith("seq"):
                self.field2seqlen[field] = 1
            if "float" in ftype.value:
                self.field2bucketnum[field] = 2
        columns.append(field)
        usecols.append(field_type)
        dtype[field_type] = np.float64 if ftype == FeatureType.FLOAT else str

    if len(columns) == 0:
        self.logger.warning(f"No columns has been loaded from [{source}]")
        return None

    df = pd.read_csv(filepath, delimiter=field_separator, usecols=usecols, dtype=dtype, encoding=encoding,
                     engine="python")
    df.columns = columns

    seq_separator = self.config["seq_separator"]
    for field in columns:
        ftype = self.field2type[field]
        if not ftype.value.endswith("seq"):
            continue
        df[field] = df[field].fillna(value="")
        if ftype == FeatureType.TOKEN_SEQ:
            df[field] = [np.array(list(filter(None, _.split(seq_separator)))) for _ in df[field].values]
        elif ftype == FeatureType.FLOAT_SEQ:
            df[field] = [np.array(list(map(float, filter(None, _.split(seq_separator))))) for _ in df[field].values]
        max_seq_len = max(map(len, df[field].values))
        if self.config["seq_len"] and field in self.config["seq_len"]:
            seq_len = self.config["seq_len"][field]
            df[field] = [seq[:seq_len] if len(seq) > seq_len else seq for seq in df[field].values]
            self.field2seqlen[field] = min(seq_len, max_seq_len)
        else:
            self.field2seqlen[field] = max_seq_len

    return df


Dataset._fill_nan = _fill_nan
Dataset._load_feat = _load_feat


def plain_config(config):
    """Config -> dict of primitives, so a checkpoint loads with ``torch.load(weights_only=True)``.

    RecBole pickles its ``Config`` object into checkpoints; torch >= 2.6 refuses to unpickle it
    by default, and turning that safety off would let any checkpoint run arbitrary code.
    """
    items = config.final_config_dict.items() if hasattr(config, "final_config_dict") else config.items()
    return {str(key): _to_plain(value) for key, value in items}


def _to_plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_to_plain(v) for v in value]
    return str(value)


def load_checkpoint(path, map_location="cpu"):
    """Load a recbole-mm checkpoint without executing pickled code (``weights_only=True``).

    RecBole's own checkpoints (with a pickled ``Config``) are rejected with an explanation
    rather than loaded unsafely.
    """
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises UnpicklingError / RuntimeError variants here
        raise ValueError(
            f"Checkpoint {path} cannot be loaded safely (torch.load(weights_only=True) failed: "
            f"{str(error).splitlines()[0]}). recbole-mm only loads checkpoints that contain tensors "
            "and plain data; a checkpoint written by RecBole's own Trainer pickles its Config. "
            "Retrain with recbole-mm, or re-save the checkpoint with the config converted to a dict."
        ) from error
