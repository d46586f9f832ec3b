from recbole_mm.data.dataset import MultimodalSequentialDataset, SequentialDataset

__all__ = ["MultimodalSequentialDataset", "SequentialDataset"]
