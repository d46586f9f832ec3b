from recbole_mm.data.dataset import MultimodalSequentialDataset, SequentialDataset
from recbole_mm.data.utils import create_dataset

__all__ = ["MultimodalSequentialDataset", "SequentialDataset", "create_dataset"]
