"""What identifies a cell: its effective configuration, with the dataset folder's content in place
of its location, hashed (``config_hash``): a rerun finds finished cells, any change gives a new one. The hash covers the
configuration and the data, not the code: a change of what a model computes under the same settings
needs a new output folder (or the old cells removed)."""
import hashlib
import json
import os
from pathlib import Path

from recbole_mm.compat import plain_config
from recbole_mm.config import Config


def effective_config(model, dataset, config_file_list=None, config_dict=None, cmd_args=()):
    """The run's final configuration as plain data (what a checkpoint stores)."""
    return plain_config(Config(model, dataset, config_file_list, config_dict, cmd_args))


# Keys that say where or how a run executes, not what it computes: left out of the config hash
# so that a results store stays valid when moved between machines or working directories
# (``extra_config_keys`` only declares keys, whose values are hashed themselves).
# ``data_path`` is replaced by the content of the dataset folder (``dataset_fingerprint``).
# ``flush_denormal`` is the CPU's arithmetic mode, like ``device``: it changes values only below float32's
# smallest normal number (a GPU flushes them in many kernels anyway), so cells trained before it keep their hash.
PLACEMENT_KEYS = ("checkpoint_dir", "device", "gpu_id", "use_gpu", "show_progress", "state", "data_path",
                  "local_rank", "single_spec", "log_wandb", "wandb_project", "worker", "extra_config_keys",
                  "full_sort_item_chunk", "flush_denormal")

# Options added after results stores existed, each with the value that computes what runs did before
# the option: at that value the key is left out of the hash, so adding an option that is off by
# default keeps every stored cell valid; any other value is a different cell.
BEHAVIOUR_PRESERVING_DEFAULTS = {
    "gradient_accumulation_loss": "mean",
    "train_micro_batch_size": None,
    "mixed_precision": None,
    "no_weight_decay_on": [],
    "optimizer_eps": None,
    "recipe": None,
    "timestamps_are_order": False,
    "rqvae_reseed_dead_codes": False,
    "feature_centring": False,
    "answer_head": "label",
}

_file_digests = {}  # (path, size, mtime_ns) -> sha256: a table run hashes each dataset file once


def _file_digest(path):
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def dataset_fingerprint(config):
    """Names and contents of the files a run reads: the top-level files of its dataset folder plus
    every feature table or mask stored elsewhere (another folder, or a subfolder of this one, as a
    relative path in ``feature_tables`` resolves against the dataset folder). Two datasets that share
    a name but not their data get different cells; the same data in another folder keeps its cells.
    The converters' ``<dataset>.manifest.json`` is left out: no run reads it, and it records where and
    when the raw files were copied (their paths and modification times), so a conversion of the same
    raw files on another machine would otherwise lose every stored cell."""
    folder = config.get("data_path")
    if not folder or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    files = {path.name: path for path in folder.iterdir()
             if path.is_file() and path.name != f"{config.get('dataset')}.manifest.json"}
    top_level = {path.resolve() for path in files.values()}
    for name, entry in (config.get("feature_tables") or {}).items():
        entry = entry if isinstance(entry, dict) else {"path": entry}
        for key, label in (("path", f"feature_tables.{name}"), ("mask", f"feature_tables.{name}.mask")):
            if not entry.get(key):
                continue
            path = folder / entry[key]  # an absolute path stays itself
            if path.is_file() and path.resolve() not in top_level:
                files[label] = path
    return {name: _file_digest(path) for name, path in sorted(files.items())}


def config_hash(config):
    """Short stable hash of an effective config (a plain dict) and of the dataset files it reads,
    placement keys excluded."""
    kept = {key: value for key, value in config.items() if key not in PLACEMENT_KEYS
            and not (key in BEHAVIOUR_PRESERVING_DEFAULTS and value == BEHAVIOUR_PRESERVING_DEFAULTS[key])}
    kept["dataset files"] = dataset_fingerprint(config)
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
