"""RecBole Config that also reads recbole-mm's ``properties/`` and finds recbole-mm models.

Precedence, lowest first: RecBole's defaults < ``properties/overall.yaml`` <
``properties/dataset/<Dataset>.yaml`` < ``properties/model/<Model>.yaml`` <
``properties/recipes/<Model>-<recipe>.yaml`` (with ``recipe: <name>``) < ``--config_files`` <
``config_dict`` < ``--key=value`` on the command line.

Where datasets are read (and converters write), highest first: ``data_path`` given by the user
(command line, config files, config_dict) > ``$RECBOLE_MM_DATA`` > ``./dataset`` (RecBole's default).
"""
import difflib
import functools
import math
import os
from logging import getLogger
from pathlib import Path

import torch
import yaml

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_mm import compat  # noqa: F401  (warning filters before RecBole loads data)
from recbole_mm import evaluator  # noqa: F401  (registers HR / ValidRatio / VHR before metric names are checked)
from recbole_mm.config.keys import (EXTRA_KEYS_KEY, describe_types, expected_types, known_keys, other_models_keys,
                                    type_matches)
from recbole_mm.utils import RecboleMMError, get_model
from recbole_mm.utils.distributed import init_distributed_device

# Package data: the same files as the project's top-level properties/ (a link to this folder).
PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"
DATA_ENV_VAR = "RECBOLE_MM_DATA"
# RecBole's overall.yaml default, which its context-aware quick-start yaml switches off
CONTEXT_NEGATIVE_SAMPLING = {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False,
                             "candidate_num": 0}


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives one key twice: YAML keeps the last silently."""


@functools.lru_cache(maxsize=None)
def unique_key_loader(base):
    """``base`` (RecBole's yaml loader) refusing a key given twice in one mapping."""

    class UniqueKeyLoader(base):
        def construct_mapping(self, node, deep=False):
            first_line = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKeyError(problem=f"{key} is given twice (lines {first_line[key]} and {line})",
                                            problem_mark=key_node.start_mark)
                first_line[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def default_data_path():
    """Where datasets live when the user's config gives no ``data_path``: ``$RECBOLE_MM_DATA``,
    else ``dataset/`` in the working directory (RecBole's own default)."""
    return Path(os.environ.get(DATA_ENV_VAR) or "dataset")


def recipe_file(model, recipe):
    """``properties/recipes/<model>-<recipe>.yaml``; an error listing the model's recipes when absent."""
    path = PROPERTIES_DIR / "recipes" / f"{model}-{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem.split("-", 1)[1] for p in (PROPERTIES_DIR / "recipes").glob(f"{model}-*.yaml"))
        raise RecboleMMError(f"recipe: no recipe {recipe!r} for {model} ({path} does not exist); "
                             f"{model}'s recipes: {', '.join(known) or 'none'}.")
    return path


def set_denormal_flushing(flush):
    """CPU arithmetic on denormal floats (|x| < 1.2e-38) is many times slower than on normal ones,
    and training makes them: weights pulled towards zero by weight decay, products of small decays.
    A trained MMM4Rec checkpoint had 12,192 denormal weights and its training step ran 3.7x slower
    than with them flushed to zero (benchmarks/bench_denormals.py). Flushing changes values only
    below float32's smallest normal number. Process-wide, as torch's setting is."""
    if not torch.set_flush_denormal(bool(flush)) and flush:
        getLogger().warning("flush_denormal: this CPU cannot flush denormal floats to zero (it needs SSE3); "
                            "training runs with them, which can be several times slower late in training.")


class Config(RecBoleConfig):
    """``cmd_args``: the ``--key=value`` strings of a command line. Unlike RecBole, ``sys.argv`` is
    never read implicitly, so a library call (a test run by pytest, a notebook) cannot pick up
    unrelated command-line flags as configuration.

    Every key given by the user (config files, ``config_dict``, command line) must be known
    (``recbole_mm.config.keys``) and its value must have its default's type; a deliberate extra key
    is listed in ``extra_config_keys``. Anything else is a ``RecboleMMError`` naming the key, where it
    came from and the closest known names, before anything runs.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=()):
        self._cmd_args = list(cmd_args)
        self._key_sources = {}  # key -> where the user gave it, lowest precedence first
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as error:
            # RecBole's own checks of values (eval_args mode, metrics, topk, repeatable, ...) raise these
            reason = " ".join(str(error).split()).rstrip(".")
            raise RecboleMMError(f"RecBole refuses the configuration: {reason}. Fix that setting (--key=value, a "
                                 "config file or config_dict).") from error
        set_denormal_flushing(self["flush_denormal"])

    def _note_sources(self, keys, source):
        for key in keys:
            self._key_sources.setdefault(key, []).append(source)

    def _load_config_files(self, file_list):
        file_config_dict = {}
        for file in file_list or []:
            try:
                with open(file, "r", encoding="utf-8") as handle:
                    content = yaml.load(handle.read(), Loader=unique_key_loader(self.yaml_loader))
            except FileNotFoundError:
                raise RecboleMMError(f"Config file {file} (--config_files) not found: check the path "
                                     "(relative paths are read from the working directory).") from None
            except DuplicateKeyError as error:
                raise RecboleMMError(f"Config file {file}: {error.problem}; YAML would keep the last one silently. "
                                     "Keep the one you mean.") from None
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                reason = " ".join(str(error).split())
                raise RecboleMMError(f"Config file {file} is not valid YAML ({reason}). Fix the file.") from None
            if content is None:
                continue
            if not isinstance(content, dict):
                raise RecboleMMError(f"Config file {file} holds a {type(content).__name__}, not 'key: value' lines.")
            self._note_sources(content, f"config file {file}")
            file_config_dict.update(content)
        return file_config_dict

    def _load_variable_config_dict(self, config_dict):
        self._note_sources(config_dict or {}, "config_dict")
        return super()._load_variable_config_dict(config_dict)

    def _load_cmd_line(self):
        cmd_config_dict = {}
        for arg in self._cmd_args:
            if not arg.startswith("--") or "=" not in arg:
                raise RecboleMMError(f"Command-line argument {arg!r} is not of the form --key=value.")
            key, value = arg[2:].split("=", 1)
            if key in cmd_config_dict and cmd_config_dict[key] != value:
                raise RecboleMMError(f"--{key} is given twice with different values.")
            cmd_config_dict[key] = value
        self._note_sources(cmd_config_dict, "the command line")
        cmd_config_dict = self._convert_config_dict(cmd_config_dict)
        for key, value in cmd_config_dict.items():
            if isinstance(value, str) and value[:1] in "[{":
                # RecBole eval()s values, so --modalities=[text,image] stays a string; read it as YAML
                try:
                    cmd_config_dict[key] = yaml.load(value, Loader=self.yaml_loader)
                except yaml.YAMLError:
                    raise RecboleMMError(f"--{key}={value}: not a valid list or mapping; write e.g. "
                                         f"--{key}=[a,b] or --{key}={{k: v}} (quoted in the shell).") from None
        return cmd_config_dict

    def _get_model_and_dataset(self, model, dataset):
        if isinstance(model, str) or model is None:
            model = model or self.external_config_dict.get("model")
            if model is None:
                raise KeyError("model must be given: --model=<Name>, a config file or config_dict")
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for file in (
            PROPERTIES_DIR / "overall.yaml",
            PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
            PROPERTIES_DIR / "model" / f"{model}.yaml",
        ):
            if file.is_file():
                config_dict = self._update_internal_config_dict(str(file))
                if file.parent.name == "dataset" and config_dict:
                    self.parameters["Dataset"] += [
                        key for key in config_dict if key not in self.parameters["Dataset"]
                    ]
        recipe = self.external_config_dict.get("recipe")
        if recipe:
            self._update_internal_config_dict(str(recipe_file(model, recipe)))

    def _get_final_config_dict(self):
        self._check_user_keys()
        final_config_dict = super()._get_final_config_dict()
        if (final_config_dict["MODEL_TYPE"] == ModelType.SEQUENTIAL and final_config_dict.get("loss_type") == "CE"
                and "train_neg_sample_args" not in self.external_config_dict):
            final_config_dict["train_neg_sample_args"] = None  # full softmax: a sampled negative is never used
        if final_config_dict["MODEL_TYPE"] == ModelType.CONTEXT and "train_neg_sample_args" not in self.external_config_dict:
            # RecBole's context-aware defaults read labels from explicit ratings; here every model ranks
            # all items on implicit data, so the 0/1 labels come from one sampled negative per positive
            final_config_dict["train_neg_sample_args"] = dict(CONTEXT_NEGATIVE_SAMPLING)
        return final_config_dict

    def _where(self, key):
        source = self._key_sources.get(key, ["config"])[-1]
        return f"--{key} on the command line" if source == "the command line" else f"{key} in {source}"

    def declared_extra_keys(self):
        extra = self.external_config_dict.get(EXTRA_KEYS_KEY) or []
        return [extra] if isinstance(extra, str) else list(extra)

    def unknown_keys(self):
        """The user's keys that no model or component reads and ``extra_config_keys`` does not declare."""
        known = self._run_keys() | other_models_keys(str(PROPERTIES_DIR))
        extra = self.declared_extra_keys()
        return sorted(key for key in self.external_config_dict if key not in known and key not in extra)

    def keys_for_other_models(self):
        """The user's keys that only other models read (e.g. from a config file shared by several):
        accepted; ``quick_start.build`` logs a warning naming them."""
        run_keys, extra = self._run_keys(), self.declared_extra_keys()
        return sorted(key for key in self.external_config_dict
                      if key not in run_keys and key not in extra and key in other_models_keys(str(PROPERTIES_DIR)))

    def _run_keys(self):
        return known_keys(self.model, self.model_class, PROPERTIES_DIR) | set(self.internal_config_dict)

    def _check_user_keys(self):
        """Unknown keys and values of the wrong type are errors (RecBole accepts both silently)."""
        self._check_known()
        self._check_types()

    def _check_known(self):
        unknown = self.unknown_keys()
        if not unknown:
            return
        known = self._run_keys() | other_models_keys(str(PROPERTIES_DIR))
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.7)
            described.append(self._where(key) + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        them = "them" if len(unknown) > 1 else "it"
        raise RecboleMMError(
            f"Unknown configuration key{'s' if len(unknown) > 1 else ''} for {self.model}: {'; '.join(described)}. "
            f"No RecBole or recbole-mm model or component reads {them}, so the run would silently ignore {them}. Fix the "
            f"spelling; a key your own code reads is declared with {EXTRA_KEYS_KEY}: [{', '.join(unknown)}] "
            f"(config file) or --{EXTRA_KEYS_KEY}=[{','.join(unknown)}]."
        )

    def _check_types(self):
        for key, value in self.external_config_dict.items():  # keys without a default (extra keys) take anything
            default = self.internal_config_dict.get(key)
            types = expected_types(key, default)
            if not type_matches(value, types):
                raise RecboleMMError(
                    f"{self._where(key)} is {value!r} ({type(value).__name__}), but {key} takes "
                    f"{describe_types(types)} (default: {default!r}). Give a value of that type."
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise RecboleMMError(
                    f"{self._where(key)} is {value!r}: a number here must be finite (default: {default!r}); "
                    f"give a finite value, or ~ for the default behaviour."
                )

    def _init_device(self):
        if "local_rank" in self.final_config_dict:  # a DDP worker: RecBole's own set-up is NCCL/CUDA only
            init_distributed_device(self.final_config_dict)
        else:
            super()._init_device()

    def _set_default_parameters(self):
        self.final_config_dict["data_path"] = str(self._resolve_data_root())
        super()._set_default_parameters()
        self.final_config_dict.setdefault("modalities", [])
        self.final_config_dict.setdefault("feature_tables", {})
        self.history_fields_not_features = self._keep_histories_out_of_context_features()

    def _keep_histories_out_of_context_features(self):
        """A context-aware model embeds every loaded interaction column, but full ranking scores each user
        against all items from user and item columns only, so a benchmark file's history column
        (``item_id_list``, an alias of the item id) would be missing at the first evaluation (RecBole:
        ``KeyError: 'item_id_list'``). It is still loaded, so that history-only items get ids as for every
        other model, and then dropped as RecBole's ``unused_col`` drops columns loaded only for preparation.
        Returns the fields so dropped (``quick_start.build`` logs them)."""
        config = self.final_config_dict
        if (config["MODEL_TYPE"] != ModelType.CONTEXT or config.get("double_tower")
                or "full" not in config["eval_args"]["mode"].values()):
            return []
        loaded = (config.get("load_col") or {}).get("inter")
        histories = [field for field in config.get("alias_of_item_id") or []
                     if field.endswith(config["LIST_SUFFIX"]) and (loaded is None or field in loaded)]
        unused = dict(config.get("unused_col") or {})
        added = [field for field in histories if field not in (unused.get("inter") or [])]
        if added:
            unused["inter"] = list(unused.get("inter") or []) + added
            config["unused_col"] = unused
        return added

    def _resolve_data_root(self):
        """The user's ``data_path`` (relative to the working directory), else ``default_data_path()``.
        The packaged yaml files set none, so RecBole's ``dataset/`` default is replaced here."""
        if "data_path" in self.external_config_dict:
            return Path(self.external_config_dict["data_path"])
        return default_data_path()
