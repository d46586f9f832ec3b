"""Which configuration keys a run can use, and what type their values must have.

A key is known when some component of the run reads it: RecBole's and recbole-mm's yaml defaults (overall,
dataset, quick-start and the model's own file), the keys RecBole's and recbole-mm's code read
without a yaml default (``config["local_rank"]``, ``"alpha" in config``, ...), the keys the model
class's own source reads, and the keys a model declares in ``CONFIG_KEYS``. Keys of other models
(a config file shared by several models) are accepted with a warning; anything else is a typo or a
user's own key, which is listed in ``extra_config_keys``.
"""
import inspect
import re
from functools import lru_cache
from pathlib import Path

import recbole
import yaml

RECBOLE_DIR = Path(recbole.__file__).resolve().parent
RECBOLE_MM_DIR = Path(__file__).resolve().parent.parent
EXTRA_KEYS_KEY = "extra_config_keys"
# Keys the Config itself takes, and keys RecBole sets for itself (never from the user's files).
ALWAYS_KNOWN = {"model", "dataset", EXTRA_KEYS_KEY, "config_files", "MODEL_TYPE", "MODEL_INPUT_TYPE",
                "eval_type", "device", "single_spec", "local_rank", "train_neg_sample_args", "valid_neg_sample_args",
                "test_neg_sample_args", "eval_neg_sample_args"}

_READS = re.compile(
    r"""(?:config|final_config_dict)\s*\[\s*["']([A-Za-z_]\w*)["']\s*\]"""   # config["key"]
    r"""|["']([A-Za-z_]\w*)["']\s+(?:not\s+)?in\s+(?:self\.)?config\b"""        # "key" in config
    r"""|config(?:_dict)?\.(?:get|setdefault)\(\s*["']([A-Za-z_]\w*)["']"""     # config.get("key")
    r"""|_config_value\(\s*config\s*,\s*["']([A-Za-z_]\w*)["']"""               # recbole-mm's llm helper
)


def _yaml_keys(path):
    if not Path(path).is_file():
        return set()
    return set(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})


@lru_cache(maxsize=None)
def _keys_read_in(path):
    text = Path(path).read_text(encoding="utf-8")
    return frozenset(key for match in _READS.finditer(text) for key in match.groups() if key)


@lru_cache(maxsize=None)
def _shared_keys(recbole_mm_properties):
    """Keys known for every model: yaml defaults and code reads outside the model classes."""
    from recbole_mm.utils.distributed import DISTRIBUTED_KEYS

    keys = set(ALWAYS_KNOWN) | set(DISTRIBUTED_KEYS)
    keys |= _yaml_keys(RECBOLE_DIR / "properties" / "overall.yaml")
    for folder in ("dataset", "quick_start_config"):
        for path in (RECBOLE_DIR / "properties" / folder).glob("*.yaml"):
            keys |= _yaml_keys(path)
    properties = Path(recbole_mm_properties)
    keys |= _yaml_keys(properties / "overall.yaml")
    for path in (properties / "dataset").glob("*.yaml"):
        keys |= _yaml_keys(path)
    from recbole.config import configurator as recbole_configurator

    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys |= set(getattr(recbole_configurator, name, ()))
    for path in RECBOLE_DIR.rglob("*.py"):  # RecBole outside its model zoo (a model's own reads: model_keys)
        if "model" not in path.relative_to(RECBOLE_DIR).parts[:1]:
            keys |= _keys_read_in(path)
    for path in RECBOLE_MM_DIR.rglob("*.py"):
        # recbole-mm's layers, trainer, data, ...; models: model_keys; tools read trained models' keys
        if path.parent.name != "model" and "tools" not in path.relative_to(RECBOLE_MM_DIR).parts:
            keys |= _keys_read_in(path)
    return frozenset(keys)


def model_keys(model_name, model_class, recbole_mm_properties):
    """The model's own keys: its yaml files, what its class (and base classes) read, ``CONFIG_KEYS``."""
    keys = _yaml_keys(RECBOLE_DIR / "properties" / "model" / f"{model_name}.yaml")
    keys |= _yaml_keys(Path(recbole_mm_properties) / "model" / f"{model_name}.yaml")
    for cls in inspect.getmro(model_class):
        if cls.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        try:
            keys |= _keys_read_in(inspect.getsourcefile(cls))
        except (OSError, TypeError):  # a class without a source file (defined interactively): its declared keys only
            pass
        keys |= set(getattr(cls, "CONFIG_KEYS", ()))
    return keys


@lru_cache(maxsize=None)
def other_models_keys(recbole_mm_properties):
    """Keys of any RecBole or recbole-mm model (yaml files and model sources): a shared config file
    for several models may carry them, so they are accepted (with a warning) for every model."""
    keys = set()
    for folder in (RECBOLE_DIR / "properties" / "model", Path(recbole_mm_properties) / "model"):
        for path in folder.glob("*.yaml"):
            keys |= _yaml_keys(path)
    for path in list((RECBOLE_DIR / "model").rglob("*.py")) + list((RECBOLE_MM_DIR / "model").glob("*.py")):
        keys |= _keys_read_in(path)
    return frozenset(keys)


def known_keys(model_name, model_class, recbole_mm_properties):
    """Keys this model's run reads (shared components and the model itself)."""
    return set(_shared_keys(str(recbole_mm_properties))) | model_keys(model_name, model_class, recbole_mm_properties)


# Keys whose values RecBole itself accepts in more than one shape.
ACCEPTED_TYPES = {
    "topk": (list, int),          # topk: 10 == [10]
    "metrics": (list, str),       # metrics: Recall == [Recall]
    "gpu_id": (str, int),         # --gpu_id=0
    "benchmark_filename": (list, str),
    "seed": (int,),
}

TYPE_NAMES = {bool: "a boolean (True/False)", int: "an integer", float: "a number", str: "a string",
              list: "a list", dict: "a mapping"}


def expected_types(key, default):
    """The types a value of ``key`` may have, given its default; None when anything goes."""
    if key in ACCEPTED_TYPES:
        return ACCEPTED_TYPES[key]
    if default is None:
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)    # 0 is a fine learning rate or dropout
    if isinstance(default, (list, tuple)):
        return (list,)
    if isinstance(default, dict):
        return (dict,)
    if isinstance(default, str):
        return (str,)
    return None


def describe_types(types):
    return " or ".join(TYPE_NAMES[t] for t in types if not (t is int and float in types))


def type_matches(value, types):
    if value is None or types is None:
        return True  # null always means "unset / RecBole's behaviour"
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, tuple):
        value = list(value)
    return isinstance(value, types)
