"""Every workaround recbole-mm needs around RecBole 1.2.1 and its dependency stack, in one place.

Version pins that avoid breakage instead of working around it live in ``setup.cfg``:
numpy < 2 (RecBole uses ``np.float_``), pandas < 2.3 (RecBole's chained ``fillna(inplace=True)``
stops working under copy-on-write). Never import ``recbole.quick_start`` or
``recbole.trainer.hyper_tuning``'s ray path: ray 2.6 fails to import on current stacks.
"""
import enum
import os
import warnings

import torch

# RecBole's chained fillna and groupby calls emit pandas FutureWarnings on every dataset load;
# they are harmless under the pinned pandas and drown the training log.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")
# RecBole's trainer builds torch.cuda.amp.GradScaler, deprecated in torch >= 2.4 (behaviour unchanged).
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning)


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
        if magic[:1] == b"\x80" or (magic == b"PK\x03\x04" and "Unsupported global" in str(error)):
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
