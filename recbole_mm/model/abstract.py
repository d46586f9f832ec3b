"""Base class of every recbole-mm model that reads item features through the feature hook."""
import torch
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_mm.utils import RecboleMMError

DEFAULT_ITEM_CHUNK = 65536  # properties/overall.yaml's full_sort_item_chunk


class MultimodalSequentialRecommender(SequentialRecommender):
    """SequentialRecommender with the run's feature tables as frozen, non-persistent buffers.

    Non-persistent: checkpoints stay small and carry no dataset-specific tables, so a model
    trained on one dataset can be loaded onto another with the same feature dimensions.
    """

    needs_features = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.modalities = list(config["modalities"] or [])
        item_features = getattr(dataset, "item_features", None)
        if self.modalities and item_features is None:
            raise RecboleMMError(
                f"{type(self).__name__} reads item features {self.modalities}, but the dataset is a "
                f"{type(dataset).__name__}; build it with recbole_mm.data.create_dataset."
            )
        self.feature_dims = {}
        for name in self.modalities:
            self.register_feature_table(name, item_features[name], dataset.item_feature_masks[name])
        self.has_timestamps = bool(getattr(dataset, "has_timestamps", False))
        settings = getattr(config, "final_config_dict", config)  # a Config, or a plain dict in unit tests
        self.full_sort_item_chunk = int(settings.get("full_sort_item_chunk", DEFAULT_ITEM_CHUNK) or 0)

    def register_feature_table(self, name, table, mask):
        """Add a frozen (n_items, D) table that does not come from the dataset (e.g. ID embeddings
        of a pre-trained SASRec); ``feature_table(name)`` / ``feature_mask(name)`` then serve it."""
        if table.shape[0] != self.n_items or mask.shape != (self.n_items,):
            raise RecboleMMError(
                f"Feature table '{name}' has {table.shape[0]} rows (mask {tuple(mask.shape)}) for "
                f"{self.n_items} items (padding included)."
            )
        self.register_buffer(f"item_feature_{name}", table.float(), persistent=False)
        self.register_buffer(f"item_feature_mask_{name}", mask.bool(), persistent=False)
        self.feature_dims[name] = table.shape[1]

    def feature_table(self, name):
        """(n_items, D) frozen features of one modality; missing items are zero rows."""
        return getattr(self, f"item_feature_{name}")

    def feature_mask(self, name):
        """(n_items,) bool: the item has a real feature row for this modality."""
        return getattr(self, f"item_feature_mask_{name}")

    def concatenated_features(self):
        """(n_items, sum of dims): the run's modalities side by side, in ``modalities`` order."""
        return torch.cat([self.feature_table(name) for name in self.modalities], dim=-1)

    def scores_in_item_chunks(self, user, score_items):
        """(B, n_items) scores, ``score_items(user, item_ids) -> (B, len(item_ids))`` called on chunks of
        ``full_sort_item_chunk`` items (all items at once when 0), written into one preallocated matrix:
        peak memory is that matrix plus one chunk's intermediates, not the whole catalogue's."""
        chunk = self.full_sort_item_chunk
        if not chunk or chunk >= self.n_items:
            return score_items(user, None)
        scores = None
        for start in range(0, self.n_items, chunk):
            items = torch.arange(start, min(start + chunk, self.n_items), device=user.device)
            part = score_items(user, items)
            if scores is None:
                scores = part.new_empty(user.shape[0], self.n_items)
            scores[:, start:start + len(items)] = part
        return scores

    def projected_features(self, projection):
        """``projection(concatenated_features())``, (n_items, d). Without autograd (evaluation) it runs
        in chunks of ``full_sort_item_chunk`` items, so the (n_items, sum of dims) concatenation of a
        large catalogue is never built; with autograd it is one call (backward needs its input)."""
        chunk = self.full_sort_item_chunk
        if torch.is_grad_enabled() or not chunk or chunk >= self.n_items:
            return projection(self.concatenated_features())
        return torch.cat([
            projection(torch.cat([self.feature_table(name)[start:start + chunk] for name in self.modalities], dim=-1))
            for start in range(0, self.n_items, chunk)
        ])
