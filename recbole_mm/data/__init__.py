from recbole_mm.data.dataset import MultimodalSequentialDataset

__all__ = ["MultimodalSequentialDataset"]
