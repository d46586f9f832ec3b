"""Which dataset class a model gets (RecBole's ``recbole.data.utils.create_dataset``, extended)."""
import importlib

from recbole.utils import FeatureSource, FeatureType, ModelType

from recbole_mm.data.atomic_files import check_atomic_files
from recbole_mm.data.dataset import MultimodalSequentialDataset, SequentialDataset
from recbole_mm.utils import RecboleMMError, get_model


def create_dataset(config):
    """Build the dataset the model needs: the multimodal one when the model reads item features,
    RecBole's own class otherwise. Never loads RecBole's pickled dataset cache. The atomic files are
    checked first (``recbole_mm.data.atomic_files``)."""
    check_atomic_files(config)
    model_class = getattr(config, "model_class", None) or get_model(config["model"])
    if getattr(model_class, "needs_features", False):
        return MultimodalSequentialDataset(config)
    dataset_module = importlib.import_module("recbole.data.dataset")
    special = config["model"] + "Dataset"
    if hasattr(dataset_module, special):
        return getattr(dataset_module, special)(config)
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        return SequentialDataset(config)
    if config["MODEL_TYPE"] == ModelType.KNOWLEDGE:
        return dataset_module.KnowledgeBasedDataset(config)
    dataset = dataset_module.Dataset(config)
    if config["MODEL_TYPE"] == ModelType.CONTEXT:
        check_context_features(config, dataset)
    return dataset


def interaction_features_of_context_model(config, dataset):
    """The interaction-file columns a context-aware model would embed (RecBole's ContextRecommender:
    every token and token-sequence column, float columns listed in ``numerical_features``), less
    those ``unused_col`` drops after loading."""
    if config["double_tower"]:  # the two towers read user and item columns only
        return []
    unused = set((config["unused_col"] or {}).get("inter") or [])
    numerical = set(config["numerical_features"] or [])
    fields = []
    for field in dataset.fields(source=[FeatureSource.INTERACTION]):
        kind = dataset.field2type[field]
        embedded = kind in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ) or field in numerical
        if embedded and field != config["LABEL_FIELD"] and field not in unused:
            fields.append(field)
    return fields


def check_context_features(config, dataset):
    """Full ranking scores a user against every item from the user's and the items' columns only, so a
    context-aware model that reads a per-interaction column cannot be evaluated: RecBole would train
    an epoch and then fail with ``KeyError: '<column>'``. Refused here, before anything trains."""
    modes = config["eval_args"]["mode"]
    fields = interaction_features_of_context_model(config, dataset)
    if not fields or "full" not in modes.values():
        return
    names = ", ".join(fields)
    raise RecboleMMError(
        f"{config['model']} on dataset '{config['dataset']}': the interaction file's column(s) {names} would be "
        f"read by {config['model']} as per-interaction features, but full-ranking evaluation (eval_args mode: "
        "full) scores each user against every item from user and item columns only, so evaluation would fail. "
        f"Leave them out of load_col.inter, or load them without using them as features with "
        f"unused_col: {{inter: [{names}]}}, or move them to the .user/.item file."
    )
