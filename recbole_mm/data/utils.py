"""Which dataset class a model gets (RecBole's ``recbole.data.utils.create_dataset``, extended)."""
import importlib

from recbole.utils import ModelType

from recbole_mm.data.dataset import MultimodalSequentialDataset, SequentialDataset
from recbole_mm.utils import get_model


def create_dataset(config):
    """Build the dataset the model needs: the multimodal one when the model reads item features,
    RecBole's own class otherwise. Never loads RecBole's pickled dataset cache."""
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
    return dataset_module.Dataset(config)
