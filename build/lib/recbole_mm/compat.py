"""Every workaround recbole-mm needs around RecBole 1.2.1 and its dependency stack, in one place.

Version pins that avoid breakage instead of working around it live in ``setup.cfg``:
numpy < 2 (RecBole uses ``np.float_``), pandas < 2.3 (RecBole's chained ``fillna(inplace=True)``
stops working under copy-on-write). Never import ``recbole.quick_start`` or
``recbole.trainer.hyper_tuning``'s ray path: ray 2.6 fails to import on current stacks.
"""
import enum
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
