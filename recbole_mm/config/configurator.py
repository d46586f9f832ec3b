"""RecBole Config that also reads recbole-mm's ``properties/`` and finds recbole-mm models.

Precedence, lowest first: RecBole's defaults < ``properties/overall.yaml`` <
``properties/dataset/<Dataset>.yaml`` < ``properties/model/<Model>.yaml`` <
``properties/recipes/<Model>-<recipe>.yaml`` (with ``recipe: <name>``) < ``--config_files`` <
``config_dict`` < ``--key=value`` on the command line.

Where datasets are read (and converters write), highest first: ``data_path`` given by the user
(command line, config files, config_dict) > ``$RECBOLE_MM_DATA`` > ``./dataset`` (RecBole's default).
"""
import os
from pathlib import Path

import yaml

from recbole.config import Config as RecBoleConfig

from recbole_mm import compat  # noqa: F401  (warning filters before RecBole loads data)
from recbole_mm import evaluator  # noqa: F401  (registers HR / ValidRatio / VHR before metric names are checked)
from recbole_mm.utils import RecboleMMError, get_model
from recbole_mm.utils.distributed import init_distributed_device

# Package data: the same files as the project's top-level properties/ (a link to this folder).
PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"
DATA_ENV_VAR = "RECBOLE_MM_DATA"


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


class Config(RecBoleConfig):
    """``cmd_args``: the ``--key=value`` strings of a command line. Unlike RecBole, ``sys.argv`` is
    never read implicitly, so a library call (a test run by pytest, a notebook) cannot pick up
    unrelated command-line flags as configuration."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=()):
        self._cmd_args = list(cmd_args)
        super().__init__(model, dataset, config_file_list, config_dict)

    def _load_cmd_line(self):
        cmd_config_dict = {}
        for arg in self._cmd_args:
            if not arg.startswith("--") or "=" not in arg:
                raise RecboleMMError(f"Command-line argument {arg!r} is not of the form --key=value.")
            key, value = arg[2:].split("=", 1)
            if key in cmd_config_dict and cmd_config_dict[key] != value:
                raise RecboleMMError(f"--{key} is given twice with different values.")
            cmd_config_dict[key] = value
        cmd_config_dict = self._convert_config_dict(cmd_config_dict)
        for key, value in cmd_config_dict.items():
            if isinstance(value, str) and value[:1] in "[{":
                # RecBole eval()s values, so --modalities=[text,image] stays a string; read it as YAML
                cmd_config_dict[key] = yaml.load(value, Loader=self.yaml_loader)
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

    def _resolve_data_root(self):
        """The user's ``data_path`` (relative to the working directory), else ``default_data_path()``.
        The packaged yaml files set none, so RecBole's ``dataset/`` default is replaced here."""
        if "data_path" in self.external_config_dict:
            return Path(self.external_config_dict["data_path"])
        return default_data_path()
