"""Model, trainer and dataset lookup: recbole-mm first, RecBole's built-ins second."""
import ast
import importlib
from pathlib import Path

from recbole.utils import get_trainer as recbole_get_trainer


class RecboleMMError(Exception):
    """A problem with the user's input: the CLI prints the message and exits non-zero."""


def recbole_mm_model_names():
    """Model classes in recbole_mm/model/, read from the sources (nothing is imported)."""
    model_dir = Path(__file__).resolve().parent.parent / "model"
    names = []
    for path in model_dir.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names += [node.name for node in tree.body
                  if isinstance(node, ast.ClassDef) and node.name.lower() == path.stem]
    return sorted(names)


RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "sequential_recommender",
    "context_aware_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


def _importable(module_path):
    try:
        return importlib.util.find_spec(module_path) is not None
    except ImportError:  # exlib_recommender's package imports xgboost/lightgbm, optional here
        return False


def recbole_model_names():
    names = []
    for package in RECBOLE_MODEL_PACKAGES:
        try:
            module = importlib.import_module(f"recbole.model.{package}")
        except ImportError:  # exlib models need the optional xgboost/lightgbm
            continue
        names += [name for name, obj in vars(module).items() if isinstance(obj, type)]
    return sorted(set(names))


def get_model(model_name):
    """Return the model class: ``recbole_mm.model.<name lower>.<name>`` first, then RecBole's."""
    module_path = f"recbole_mm.model.{model_name.lower()}"
    if _importable(module_path):
        module = importlib.import_module(module_path)
        if hasattr(module, model_name):
            return getattr(module, model_name)
    for package in RECBOLE_MODEL_PACKAGES:
        module_path = f"recbole.model.{package}.{model_name.lower()}"
        if _importable(module_path):
            module = importlib.import_module(module_path)
            if hasattr(module, model_name):
                return getattr(module, model_name)
    raise RecboleMMError(
        f"Unknown model '{model_name}'. recbole-mm models: {', '.join(recbole_mm_model_names())}. "
        f"RecBole built-ins: {', '.join(recbole_model_names())}. Model names are case-sensitive."
    )


def get_trainer(model_type, model_name, model_class=None):
    """Trainer for a model: ``recbole_mm.trainer.<Model>Trainer`` if it exists, else ``MMTrainer``
    for recbole-mm models (and user classes built on them) and RecBole's own trainer, with safe
    checkpoints, for RecBole's built-ins."""
    trainer_module = importlib.import_module("recbole_mm.trainer")
    if hasattr(trainer_module, model_name + "Trainer"):
        return getattr(trainer_module, model_name + "Trainer")
    model_class = model_class or get_model(model_name)
    if not model_class.__module__.startswith("recbole."):
        return trainer_module.MMTrainer
    return trainer_module.with_safe_checkpoints(recbole_get_trainer(model_type, model_name))
