"""Model, trainer and dataset lookup: recbole-mm first, RecBole's built-ins second."""
import importlib
import pkgutil

from recbole.utils import ModelType
from recbole.utils import get_trainer as recbole_get_trainer


class RecboleMMError(Exception):
    """A problem with the user's input: the CLI prints the message and exits non-zero."""


def recbole_mm_model_names():
    import recbole_mm.model as package

    names = []
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.ispkg or module_info.name in {"abstract"}:
            continue
        module = importlib.import_module(f"recbole_mm.model.{module_info.name}")
        names += [
            name for name, obj in vars(module).items()
            if isinstance(obj, type) and name.lower() == module_info.name
        ]
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


def get_trainer(model_type, model_name):
    """Trainer for a model: ``recbole_mm.trainer.<Model>Trainer`` if it exists, else ``MMTrainer``
    for recbole-mm models and RecBole's own trainer (with safe checkpoints) for built-ins."""
    trainer_module = importlib.import_module("recbole_mm.trainer")
    if hasattr(trainer_module, model_name + "Trainer"):
        return getattr(trainer_module, model_name + "Trainer")
    if is_recbole_mm_model(model_name):
        return trainer_module.MMTrainer
    recbole_trainer = recbole_get_trainer(model_type, model_name)
    return trainer_module.with_safe_checkpoints(recbole_trainer)


def is_recbole_mm_model(model_name):
    return get_model(model_name).__module__.startswith("recbole_mm.")


def create_dataset(config):
    """Build the dataset the model needs: the multimodal one when the model reads item features,
    RecBole's own class otherwise. Never loads RecBole's pickled dataset cache."""
    model_class = get_model(config["model"])
    if getattr(model_class, "needs_features", False):
        from recbole_mm.data import MultimodalSequentialDataset

        return MultimodalSequentialDataset(config)
    dataset_module = importlib.import_module("recbole.data.dataset")
    special = config["model"] + "Dataset"
    if hasattr(dataset_module, special):
        return getattr(dataset_module, special)(config)
    type_to_class = {
        ModelType.SEQUENTIAL: "SequentialDataset",
        ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    }
    return getattr(dataset_module, type_to_class.get(config["MODEL_TYPE"], "Dataset"))(config)
