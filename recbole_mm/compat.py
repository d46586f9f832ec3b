"""Every workaround recbole-mm needs around RecBole 1.2.1 and its dependency stack, in one place.

recbole-mm runs on numpy 1 and 2 and on pandas 1.5 to 3 (the tested range is pinned in ``setup.cfg``).
This module must be imported before RecBole's ``Config`` is built (``recbole_mm/__init__.py`` does).
Never import ``recbole.quick_start`` or ``recbole.trainer.hyper_tuning``'s ray path: they import
ray at module level.
"""
import enum
import os
import warnings

import numpy as np
import pandas as pd
import torch

# numpy 2 removed these numpy-1 names. RecBole 1.2.1's Config.compatibility_settings reads np.float_,
# np.complex_ and np.unicode_ (to re-add np.float, np.long, ... that its code uses) and ray 2.6's Tune
# reads np.bool8; each alias names the same type it named in numpy 1.
_NUMPY_1_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}


def restore_numpy_1_aliases():
    """Set the numpy-1 names above where numpy lacks them. Also Ray's ``worker_process_setup_hook``:
    a Ray worker imports ``ray.tune`` before any recbole-mm code runs in it."""
    for alias, numpy_type in _NUMPY_1_ALIASES.items():
        if not hasattr(np, alias):
            setattr(np, alias, numpy_type)


restore_numpy_1_aliases()

from recbole.data.dataset import Dataset, KnowledgeBasedDataset, SequentialDataset  # noqa: E402  (after the aliases)
from recbole.utils import FeatureSource, FeatureType, set_color  # noqa: E402

# RecBole's pandas calls (groupby defaults, inplace keywords) emit FutureWarnings on every dataset
# load; they are harmless and drown the training log.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")
# Under pandas copy-on-write a column's array is read-only; RecBole turns each into a tensor once and
# never writes into it in place (its samplers and augmentation build new tensors).
warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable", category=UserWarning,
                        module=r"recbole\..*")
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


# RecBole 1.2.1 takes the lengths of a column of sequences as ``column.agg(len)``. Before pandas 3
# ``Series.agg`` mapped a function over the rows; from pandas 3 it calls it on the whole column, so the
# lengths become one number (a crash in the remap, every row's ``item_length`` set to the row count in
# SequentialDataset). The methods that do it are replaced by the same steps with ``_split_points``.

def _split_points(column):
    """Where the concatenated sequences of ``column`` split back into rows."""
    return np.cumsum(column.map(len).to_numpy())[:-1]


def _remap(self, remap_list):
    """RecBole's ``Dataset._remap`` (tokens to ids with ``pd.factorize``), sequence lengths per row."""
    if len(remap_list) == 0:
        return
    tokens, split_point = self._concat_remaped_tokens(remap_list)
    new_ids_list, mp = pd.factorize(tokens)
    new_ids_list = np.split(new_ids_list + 1, split_point)
    mp = np.array(["[PAD]"] + list(mp))
    token_id = {t: i for i, t in enumerate(mp)}

    for (feat, field, ftype), new_ids in zip(remap_list, new_ids_list):
        if field not in self.field2id_token:
            self.field2id_token[field] = mp
            self.field2token_id[field] = token_id
        if ftype == FeatureType.TOKEN:
            feat[field] = new_ids
        elif ftype == FeatureType.TOKEN_SEQ:
            feat[field] = np.split(new_ids, _split_points(feat[field]))


def _normalize(self):
    """RecBole's ``Dataset._normalize`` (min-max scaling of float-like fields), sequence lengths per row."""
    if self.config["normalize_field"] is not None and self.config["normalize_all"] is True:
        raise ValueError("Normalize_field and normalize_all can't be set at the same time.")

    if self.config["normalize_field"]:
        fields = self.config["normalize_field"]
        for field in fields:
            if field not in self.field2type:
                raise ValueError(f"Field [{field}] does not exist.")
            ftype = self.field2type[field]
            if ftype != FeatureType.FLOAT and ftype != FeatureType.FLOAT_SEQ:
                self.logger.warning(f"{field} is not a FLOAT/FLOAT_SEQ feat, which will not be normalized.")
    elif self.config["normalize_all"]:
        fields = self.float_like_fields
    else:
        return

    self.logger.debug(set_color("Normalized fields", "blue") + f": {fields}")

    for field in fields:
        for feat in self.field2feats(field):

            def norm(arr):
                mx, mn = max(arr), min(arr)
                if mx == mn:
                    self.logger.warning(f"All the same value in [{field}] from [{feat}_feat].")
                    arr = 1.0
                else:
                    arr = (arr - mn) / (mx - mn)
                return arr

            ftype = self.field2type[field]
            if ftype == FeatureType.FLOAT:
                feat[field] = norm(feat[field].values)
            elif ftype == FeatureType.FLOAT_SEQ:
                feat[field] = np.split(norm(feat[field].agg(np.concatenate)), _split_points(feat[field]))


def _discretization(self):
    """RecBole's ``Dataset._discretization`` (bucketing of numerical features), sequence lengths per row."""
    dis_info = {}

    if self.config["discretization"]:
        dis_info = self.config["discretization"]

        for field in dis_info.keys():
            if field not in self.field2type:
                raise ValueError(f"Field [{field}] does not exist.")
            if field not in self.config["numerical_features"]:
                raise ValueError(f"Field [{field}] must be a numerical feature")
            ftype = self.field2type[field]
            if ftype != FeatureType.FLOAT and ftype != FeatureType.FLOAT_SEQ:
                self.logger.warning(f"{field} is not a FLOAT/FLOAT_SEQ feat, which will not be normalized.")
                del dis_info[field]

        self.logger.debug(set_color("Normalized fields", "blue") + f": {dis_info.keys()}")

    for field in self.config["numerical_features"]:
        if field in dis_info:
            info = dis_info[field]
            method = info["method"]
            bucket = None
            if method == "ED":
                if "bucket" in info:
                    bucket = info["bucket"]
                else:
                    raise ValueError("The number of buckets must be set when apply equal discretization.")

            for feat in self.field2feats(field):

                def disc(arr, method, bucket):
                    if method == "ED":  # Equal Distance/Frequency Discretization.
                        lower, upper = min(arr), max(arr) + 1e-9
                        if upper != lower:
                            arr = np.floor((arr - lower) * bucket / (upper - lower) + 1)
                        else:
                            self.logger.warning(f"All the same value in [{field}] from [{feat}_feat].")
                            arr = np.ones_like(arr) * bucket
                    elif method == "LD":  # Logarithm Discretization
                        mask = arr > 2
                        x = np.floor(np.log(arr * mask + 1e-9) ** 2 + 1)
                        x = np.where(mask, x, arr)
                        _, arr = np.unique(x, return_inverse=True)
                    else:
                        raise ValueError(f"Method [{method}] does not exist.")
                    return arr, int(max(arr) + 1)

                ftype = self.field2type[field]
                if ftype == FeatureType.FLOAT:
                    res, self.field2bucketnum[field] = disc(feat[field].values, method, bucket)
                    ret = np.ones_like(res)
                    feat[field] = np.stack([ret, res], axis=-1).tolist()
                elif ftype == FeatureType.FLOAT_SEQ:
                    split_point = _split_points(feat[field])
                    res, self.field2bucketnum[field] = disc(feat[field].agg(np.concatenate), method, bucket)
                    ret = np.ones_like(res)
                    res, ret = np.split(res, split_point), np.split(ret, split_point)
                    feat[field] = list(zip(ret, res))
        else:
            for feat in self.field2feats(field):
                ftype = self.field2type[field]
                if ftype == FeatureType.FLOAT:
                    feat[field] = np.stack([feat[field], np.ones_like(feat[field])], axis=-1).tolist()
                else:
                    split_point = _split_points(feat[field])
                    res = ret = feat[field].agg(np.concatenate)
                    res = np.ones_like(ret)
                    res, ret = np.split(res, split_point), np.split(ret, split_point)
                    feat[field] = list(zip(ret, res))


def _benchmark_presets(self):
    """RecBole's ``SequentialDataset._benchmark_presets`` (``item_length`` of pre-split histories),
    lengths per row."""
    list_suffix = self.config["LIST_SUFFIX"]
    for field in self.inter_feat:
        if field + list_suffix in self.inter_feat:
            list_field = field + list_suffix
            setattr(self, f"{field}_list_field", list_field)
    self.set_field_property(self.item_list_length_field, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
    self.inter_feat[self.item_list_length_field] = self.inter_feat[self.item_id_list_field].map(len)


def _reset_ent_remapID(self, field, idmap, id2token, token2id):
    """RecBole's ``KnowledgeBasedDataset._reset_ent_remapID`` (items and entities in one id space),
    sequence lengths per row."""
    self.field2id_token[field] = id2token
    self.field2token_id[field] = token2id
    for feat in self.field2feats(field):
        ftype = self.field2type[field]
        if ftype == FeatureType.TOKEN:
            old_idx = feat[field].values
        else:
            old_idx = feat[field].agg(np.concatenate)

        new_idx = idmap[old_idx]

        if ftype == FeatureType.TOKEN:
            feat[field] = new_idx
        else:
            feat[field] = np.split(new_idx, _split_points(feat[field]))


Dataset._remap = _remap
Dataset._normalize = _normalize
Dataset._discretization = _discretization
SequentialDataset._benchmark_presets = _benchmark_presets
KnowledgeBasedDataset._reset_ent_remapID = _reset_ent_remapID


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

    A missing, truncated, corrupt or foreign file is a ``RecboleMMError`` that says which of these
    it is; RecBole's own checkpoints (with a pickled ``Config``) are rejected with an explanation
    rather than loaded unsafely.
    """
    import pickle
    import zipfile

    from recbole_mm.utils import RecboleMMError

    path = str(path)
    if not os.path.isfile(path):
        raise RecboleMMError(f"Checkpoint {path} not found. Check the path (saved/<Model>-<time>.pth by default).")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError / EOFError variants here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            magic = handle.read(4)
        # torch's weights-only unpickler refuses every global it does not allow (a class such as RecBole's
        # Config, or a function call such as os.system) with an UnpicklingError saying so
        refused = isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)
        if magic[:1] == b"\x80" or (magic == b"PK\x03\x04" and refused):
            raise RecboleMMError(
                f"Checkpoint {path} contains pickled Python objects, which recbole-mm does not load (loading them "
                "could run arbitrary code). A checkpoint written by RecBole's own Trainer pickles its Config: retrain "
                "with recbole-mm, or re-save that checkpoint with the config converted to a dict."
            ) from None
        if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            cause = (f"it is truncated or corrupt ({size} bytes; {reason}), e.g. a copy or download that stopped "
                     "early, or a full disk")
        elif magic == b"PK\x03\x04":
            cause = f"it is corrupt ({reason})"
        else:
            cause = f"it is not a PyTorch checkpoint ({size} bytes, starts with {magic!r})"
        raise RecboleMMError(
            f"Checkpoint {path} cannot be read: {cause}. recbole-mm writes checkpoints atomically, so the file was "
            "damaged or replaced after training; use another checkpoint (the run's -last.pth resume point or its "
            "best .pth) or train again."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise RecboleMMError(
            f"Checkpoint {path} is a PyTorch file but not a recbole-mm or RecBole checkpoint (it holds {found}, "
            "not 'config' and 'state_dict'). Pass a checkpoint written by training (saved/<Model>-<time>.pth)."
        )
    return checkpoint


# RecBole's graph models (LightGCN, NGCF, GCMC, SpectralCF, NCL, KGIN, MCCLK) fill a dok_matrix
# through dict's private _update, gone since scipy 1.12 (dok_matrix no longer subclasses dict).
def _install_dok_update():
    import scipy.sparse as sparse

    if not hasattr(sparse.dok_matrix, "_update"):
        sparse.dok_matrix._update = lambda self, data: self._dict.update(data)


_install_dok_update()


# RecBole 1.2.1's sine.py calls torch.autograd.set_detect_anomaly(True) at import, and importing any of
# RecBole's sequential models imports it: every backward of every model then checks each gradient for
# NaN (an elementwise `ne` + `any` per autograd node, about a quarter of a SASRec training step on CPU)
# and keeps forward stack traces. Anomaly mode is a debugging aid that changes no value; it is switched
# off once those modules are loaded. Turn it on in your own script to debug a NaN.
def _undo_recbole_anomaly_mode():
    import recbole.model.sequential_recommender  # noqa: F401  (imports sine.py, which switches it on)

    torch.autograd.set_detect_anomaly(False)


_undo_recbole_anomaly_mode()


def tensors_only(value):
    """A model's ``other_parameter()`` as tensors and plain data: RecBole's ItemKNN keeps scipy
    sparse matrices there, which only a pickle could store (``weights_only`` refuses pickles)."""
    import numpy as np
    import scipy.sparse as sparse

    if sparse.issparse(value):
        matrix = value.tocsr()
        return {"__scipy_csr__": [matrix.shape[0], matrix.shape[1]], "data": torch.from_numpy(matrix.data),
                "indices": torch.from_numpy(matrix.indices.astype(np.int64)),
                "indptr": torch.from_numpy(matrix.indptr.astype(np.int64))}
    if isinstance(value, np.ndarray):
        return {"__numpy__": torch.from_numpy(value)}
    if isinstance(value, dict):
        return {key: tensors_only(item) for key, item in value.items()}
    return value


def from_tensors_only(value):
    """Inverse of ``tensors_only``."""
    import scipy.sparse as sparse

    if isinstance(value, dict) and "__scipy_csr__" in value:
        return sparse.csr_matrix((value["data"].numpy(), value["indices"].numpy(), value["indptr"].numpy()),
                                 shape=tuple(value["__scipy_csr__"]))
    if isinstance(value, dict) and "__numpy__" in value:
        return value["__numpy__"].numpy()
    if isinstance(value, dict):
        return {key: from_tensors_only(item) for key, item in value.items()}
    return value
