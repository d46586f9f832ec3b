"""Per-item feature tables: read a file, map its rows to RecBole internal item ids, validate.

A table arrives as ``.npy`` (N x D), a raw float32 file such as UniSRec's ``.feat1CLS`` (needs
``dim``) or a ``.pt`` tensor. Row ``r`` of the file belongs to the item whose row number is ``r``:
the ``<dataset>.item2index`` file (``token<TAB>row``) says which token that is when the item tokens
are its keys; otherwise an item token is its own row number (UniSRec datasets, whose ``.inter``
files already hold the row numbers). The result is a float32 (n_items, D) tensor in internal-id
order with row 0 (RecBole's padding item) zero, and a bool presence mask.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recbole_mm.utils import RecboleMMError

# Rows gathered per step when copying from the memory map: bounds the transient extra memory.
GATHER_CHUNK_ROWS = 4096
MAX_NAMED_TOKENS = 10


@dataclass
class FeatureTableSpec:
    name: str
    path: Path
    dim: int = None
    mask_path: Path = None
    allow_missing: bool = False

    @classmethod
    def from_config(cls, name, entry, dataset_dir):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise RecboleMMError(
                f"feature_tables.{name} must be a mapping with at least 'path' "
                f"(e.g. {{path: {name}.npy, dim: 512}}), got {entry!r}."
            )
        unknown = set(entry) - {"path", "dim", "mask", "allow_missing"}
        if unknown:
            raise RecboleMMError(
                f"feature_tables.{name} has unknown keys {sorted(unknown)}; "
                "allowed: path, dim, mask, allow_missing."
            )

        def resolve(path):
            path = Path(path)
            return path if path.is_absolute() else Path(dataset_dir) / path

        for key, kinds, meaning in (("path", (str,), "a file name"), ("mask", (str,), "a file name"),
                                    ("dim", (int,), "a positive integer"),
                                    ("allow_missing", (bool,), "true or false")):
            value = entry.get(key)
            wrong_type = value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)))
            if wrong_type or (key == "dim" and value is not None and value < 1):
                raise RecboleMMError(
                    f"feature_tables.{name}.{key} is {value!r} ({type(value).__name__}); it takes {meaning}. "
                    f"Fix feature_tables.{name} where feature_tables is set (the dataset yaml, a --config_files "
                    "file or --feature_tables)."
                )
        return cls(
            name=name,
            path=resolve(entry["path"]),
            dim=entry.get("dim"),
            mask_path=resolve(entry["mask"]) if entry.get("mask") else None,
            allow_missing=bool(entry.get("allow_missing", False)),
        )


def open_feature_file(spec):
    """Return the file's rows as an array-like (memory-mapped where the format allows)."""
    path = spec.path
    if not path.is_file():
        raise RecboleMMError(
            f"Feature table '{spec.name}': file {path} does not exist. Produce it with "
            f"dataset_conversion/ (docs/datasets.md), or fix feature_tables.{spec.name}.path where feature_tables "
            "is set (the dataset yaml, a --config_files file or --feature_tables); relative paths are read from "
            "the dataset folder."
        )
    try:
        if path.suffix == ".npy":
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".pt":
            rows = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(rows, torch.Tensor):
                raise ValueError(f"expected a tensor, found {type(rows).__name__}")
            rows = rows.numpy()
        else:
            rows = _open_raw_float32(spec)
    except RecboleMMError:
        raise
    except Exception as error:
        raise RecboleMMError(
            f"Feature table '{spec.name}': cannot read {path} ({error}). Expected .npy, .pt, or raw "
            f"float32 with feature_tables.{spec.name}.dim set."
        ) from error
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise RecboleMMError(
            f"Feature table '{spec.name}': {path} has shape {tuple(rows.shape)}, expected (items, dim) with dim >= 1 "
            "(row r = the features of item row r). Re-encode the features (dataset_conversion/encode_features.py)."
        )
    if not (np.issubdtype(rows.dtype, np.floating) or np.issubdtype(rows.dtype, np.integer)):
        raise RecboleMMError(
            f"Feature table '{spec.name}': {path} holds {rows.dtype} values, not numbers. Re-encode the features "
            "(dataset_conversion/encode_features.py writes float32)."
        )
    if spec.dim is not None and rows.shape[1] != spec.dim:
        raise RecboleMMError(
            f"Feature table '{spec.name}': {path} has dimension {rows.shape[1]} but the config says "
            f"dim: {spec.dim}. Fix feature_tables.{spec.name}.dim or re-encode the features."
        )
    return rows


def _open_raw_float32(spec):
    if spec.dim is None:
        raise RecboleMMError(
            f"Feature table '{spec.name}': {spec.path} is a raw float32 file, so its dimension must be "
            f"given: set feature_tables.{spec.name}.dim (e.g. 512 for UniSRec .feat1CLS files)."
        )
    n_values = spec.path.stat().st_size // 4
    if spec.path.stat().st_size % 4 or n_values % spec.dim:
        raise RecboleMMError(
            f"Feature table '{spec.name}': {spec.path} holds {spec.path.stat().st_size} bytes, not a whole "
            f"number of float32 rows of dim {spec.dim}. The dim is wrong or the file is truncated."
        )
    return np.memmap(spec.path, dtype=np.float32, mode="r", shape=(n_values // spec.dim, spec.dim))


def read_item2index(path):
    """``token<TAB>row`` lines -> dict token -> row; each token and each row at most once."""
    mapping, line_of_row, line_of_token = {}, {}, {}
    fix = "Regenerate it with dataset_conversion/ (one line per item, rows 0..N-1)."
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(enumerate(file, 1))
    except UnicodeDecodeError as error:
        raise RecboleMMError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}). {fix}") from None
    for line_number, line in lines:
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise RecboleMMError(
                f"{path}, line {line_number}: expected 'token<TAB>row' (row a number >= 0), found {line.strip()!r}. {fix}"
            )
        token, row = parts[0], int(parts[1])
        if token in line_of_token:
            raise RecboleMMError(f"{path}, line {line_number}: item {token!r} is listed again (first on line "
                                 f"{line_of_token[token]}), so its feature row is ambiguous. {fix}")
        if row in line_of_row:
            raise RecboleMMError(f"{path}, line {line_number}: row {row} is given again (first on line "
                                 f"{line_of_row[row]}), so two items would share one feature row. {fix}")
        line_of_token[token], line_of_row[row] = line_number, line_number
        mapping[token] = row
    return mapping


def feature_rows_for_tokens(tokens, item2index_path):
    """Row number of each item token (-1 = no row), and how the mapping was decided.

    ``tokens`` excludes RecBole's padding token.
    """
    if item2index_path is not None and Path(item2index_path).is_file():
        item2index = read_item2index(item2index_path)
        if not item2index:
            raise RecboleMMError(f"{item2index_path} is empty: it must list every item's feature row "
                                 "('token<TAB>row'). Regenerate it with dataset_conversion/, or remove it when the "
                                 "item tokens are the row numbers.")
        if any(token in item2index for token in tokens):
            return np.array([item2index.get(token, -1) for token in tokens], dtype=np.int64), (
                f"rows from {item2index_path}"
            ), len(item2index)
        known_rows = {str(row) for row in item2index.values()}
        if all(token in known_rows for token in tokens):
            # UniSRec layout: the .inter files already hold the item2index rows as tokens.
            return np.array([int(token) for token in tokens], dtype=np.int64), (
                f"item tokens are rows of {item2index_path}"
            ), len(item2index)
        raise RecboleMMError(
            f"Item tokens do not match {item2index_path}: e.g. {tokens[:3]} are neither its keys nor "
            "its row numbers. Regenerate item2index with dataset_conversion/ or remove it to map "
            "integer tokens to rows directly."
        )
    if not all(token.isdigit() for token in tokens):
        bad = [token for token in tokens if not token.isdigit()][:MAX_NAMED_TOKENS]
        raise RecboleMMError(
            f"No item2index file at {item2index_path}, and item tokens such as {bad} are not row numbers. "
            "Provide <dataset>.item2index (token<TAB>row) next to the atomic files."
        )
    return np.array([int(token) for token in tokens], dtype=np.int64), "item tokens are row numbers", None


def read_mask(spec, n_file_rows):
    """The presence mask file: (N,) or (N, 1) of bool, or of numbers that are all 0 or 1."""
    fix = f"Re-encode the features (the encoder writes both files) or fix feature_tables.{spec.name}.mask."
    try:
        values = np.load(spec.mask_path, allow_pickle=False)
    except Exception as error:
        raise RecboleMMError(f"Feature table '{spec.name}': cannot read mask {spec.mask_path} as .npy ({error}). "
                             f"{fix}") from None
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.shape[0] != n_file_rows:
        raise RecboleMMError(f"Feature table '{spec.name}': mask {spec.mask_path} has shape {values.shape}, "
                             f"expected ({n_file_rows},): one entry per feature row. {fix}")
    if values.dtype != bool:
        numeric = np.issubdtype(values.dtype, np.number)
        bad = np.flatnonzero(~np.isin(values, (0, 1))) if numeric else np.arange(len(values))
        if len(bad):
            raise RecboleMMError(f"Feature table '{spec.name}': mask {spec.mask_path} holds values other than 0/1 "
                                 f"(e.g. {values[bad[0]].item()!r} at row {bad[0]}); a mask says present (1) or missing (0). "
                                 f"{fix}")
    return values.astype(bool)


def load_feature_table(spec, item_tokens, item2index_path):
    """Build the (n_items, D) table in internal-id order and its presence mask.

    ``item_tokens``: ``dataset.field2id_token[item_field]`` (index 0 is the padding token).
    The source is memory-mapped and copied once, chunk by chunk, into the result.
    """
    rows_file = open_feature_file(spec)
    n_file_rows, dim = rows_file.shape
    tokens = [str(token) for token in item_tokens[1:]]
    rows, how, expected_rows = feature_rows_for_tokens(tokens, item2index_path)
    if expected_rows is not None and expected_rows != n_file_rows:
        raise RecboleMMError(
            f"Feature table '{spec.name}': {spec.path} has {n_file_rows} rows but {item2index_path} "
            f"lists {expected_rows} items; the features and the index are misaligned. Re-run the "
            "conversion so both come from the same item list."
        )

    file_mask = None
    if spec.mask_path is not None:
        if not spec.mask_path.is_file():
            raise RecboleMMError(
                f"Feature table '{spec.name}': mask file {spec.mask_path} does not exist "
                f"(feature_tables.{spec.name}.mask)."
            )
        file_mask = read_mask(spec, n_file_rows)

    has_row = (rows >= 0) & (rows < n_file_rows)
    present = has_row.copy()
    present[has_row] = file_mask[rows[has_row]] if file_mask is not None else True
    if not present.all() and not spec.allow_missing:
        missing = [tokens[i] for i in np.flatnonzero(~present)[:MAX_NAMED_TOKENS]]
        reason = "have no row in" if not has_row.all() else "are marked missing by the mask of"
        raise RecboleMMError(
            f"Feature table '{spec.name}': {int((~present).sum())} items {reason} {spec.path} "
            f"({how}), e.g. tokens {missing}. If missing features are expected (expired image URLs), "
            f"set feature_tables.{spec.name}.allow_missing: true; otherwise fix the feature file."
        )

    table = np.zeros((len(item_tokens), dim), dtype=np.float32)
    item_ids = np.flatnonzero(present) + 1
    source_rows = rows[present]
    for start in range(0, len(item_ids), GATHER_CHUNK_ROWS):
        ids_chunk = item_ids[start:start + GATHER_CHUNK_ROWS]
        chunk = np.asarray(rows_file[source_rows[start:start + GATHER_CHUNK_ROWS]], dtype=np.float32)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            bad_tokens = [str(item_tokens[i]) for i in ids_chunk[bad][:MAX_NAMED_TOKENS]]
            raise RecboleMMError(
                f"Feature table '{spec.name}': {spec.path} has NaN/inf values for items {bad_tokens}. "
                f"Re-encode those items, or mark them missing in a mask file (feature_tables."
                f"{spec.name}.mask) with allow_missing: true."
            )
        table[ids_chunk] = chunk
    mask = np.zeros(len(item_tokens), dtype=bool)
    mask[item_ids] = True
    return torch.from_numpy(table), torch.from_numpy(mask), how


def describe_missing(name, mask):
    n_items = mask.shape[0] - 1
    n_missing = n_items - int(mask[1:].sum())
    return f"{name}: {n_items - n_missing}/{n_items} items present ({100 * n_missing / max(n_items, 1):.1f}% missing)"
