"""MMESID's item tables produced by its earlier stages (``recbole_mm.quick_start.mmesid``), read in a
dataset's internal item-id order: the collaborative embedding E_c and each modality's semantic IDs."""
from pathlib import Path

import torch

from recbole_mm.data.features import FeatureTableSpec, load_feature_table
from recbole_mm.utils import RecboleMMError

COLLAB = "collab"


def _load(path, what, key):
    path = Path(path or "")
    if not path.is_file():
        raise RecboleMMError(
            f"MMESID: {what} file {str(path)!r} does not exist. Run the model through "
            f"quick_start.run('MMESID', ...) / run_recbole_mm.py (it produces it), or set {key} to an existing file."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def rows_for_dataset_tokens(saved_tokens, dataset, source):
    """For each internal item id of ``dataset`` (0 = padding), its row in a table saved with
    ``saved_tokens``; a clear error when an item is absent."""
    position = {str(token): row for row, token in enumerate(saved_tokens)}
    tokens = [str(token) for token in dataset.field2id_token[dataset.iid_field]]
    missing = [token for token in tokens[1:] if token not in position]
    if missing:
        raise RecboleMMError(
            f"{source} has no row for {len(missing)} items of dataset '{dataset.dataset_name}' (e.g. {missing[:5]}): "
            "it was produced on other data. Delete it / point the setting elsewhere to recompute."
        )
    return torch.tensor([position.get(token, 0) for token in tokens])


def load_collaborative_table(path, dataset):
    """E_c (n_items, D) float32 with row 0 zero, and its presence mask.

    ``path``: a ``.pt`` dict ``{item_tokens, embedding}`` (what the collab stage writes), or a
    ``.npy``/``.pt`` matrix read like a feature table (row r = item with row number r, see
    ``recbole_mm.data.features``)."""
    path = Path(path or "")
    saved = None if path.suffix == ".npy" else _load(path, "collaborative embedding", "mmesid_collab_file")
    if not isinstance(saved, dict):
        spec = FeatureTableSpec(name=COLLAB, path=path)
        item2index = Path(dataset.dataset_path) / f"{dataset.dataset_name}.item2index"
        table, mask, _ = load_feature_table(spec, dataset.field2id_token[dataset.iid_field], item2index)
        return table, mask
    rows = rows_for_dataset_tokens(saved["item_tokens"], dataset, path)
    table = saved["embedding"].float()[rows]
    table[0] = 0
    mask = torch.ones(len(rows), dtype=torch.bool)
    mask[0] = False
    return table, mask


def load_semantic_ids(path, dataset, channels):
    """{modality: {'codes': (n_items, L) long, 'codebooks': (L, S, e)}} in the dataset's id order."""
    saved = _load(path, "semantic-ID", "mmesid_sid_file")
    missing = [name for name in channels if name not in saved["codes"]]
    if missing:
        raise RecboleMMError(
            f"MMESID: {path} has semantic IDs for {sorted(saved['codes'])}, not for {missing}. Re-run the "
            "tokenizer stage with the same modalities (delete the file or set mmesid_force: True)."
        )
    rows = rows_for_dataset_tokens(saved["item_tokens"], dataset, path)
    return {name: {"codes": saved["codes"][name][rows].long(), "codebooks": saved["codebooks"][name]}
            for name in channels}
