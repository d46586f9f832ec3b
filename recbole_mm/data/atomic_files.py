"""The dataset's atomic files (``.inter`` or the pre-split ``.<name>.inter``, ``.item``, ``.user``) checked
before RecBole reads them.

RecBole reads them without asking: a column named in ``load_col`` but absent from the header is skipped,
an empty token cell becomes the padding id, an empty or ``nan`` float cell becomes the column's mean, and
a missing file, a header-only file or a text in a float column ends in a traceback (often much later:
``[timestamp] is not exist in interaction``). Here each of these is an error naming the file, the line,
the column and the fix, before anything is loaded.
"""
from pathlib import Path

import numpy as np
import pandas as pd
from recbole.utils import FeatureType, ModelType

from recbole_mm.utils import RecboleMMError

MAX_NAMED_LINES = 5
FIELD_TYPES = {kind.value for kind in FeatureType}


def check_atomic_files(config):
    """Every atomic file the run will read: present, a valid header, the columns ``load_col`` names,
    the id columns, and clean values (see the module docstring). Raises ``RecboleMMError``."""
    folder, name = Path(config["data_path"]), config["dataset"]
    benchmark = config["benchmark_filename"]
    benchmark = [benchmark] if isinstance(benchmark, str) else benchmark
    uid, iid, time_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    inter_files = [folder / f"{name}.{split}.inter" for split in benchmark] if benchmark else [folder / f"{name}.inter"]
    for path in inter_files:
        if not path.is_file():
            listed = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
            what = (f"benchmark_filename {benchmark} names pre-split files <dataset>.<name>.inter" if benchmark
                    else "a dataset without benchmark_filename is one <dataset>.inter file")
            raise RecboleMMError(f"Dataset '{name}': {path} does not exist ({what}; the folder holds {listed}). "
                                 "Convert the dataset (dataset_conversion/, docs/datasets.md) or fix data_path / "
                                 "benchmark_filename.")
        loaded, names = check_file(config, path, "inter", required=[uid, iid], unique_id=None)
        if time_field and not benchmark and time_field not in loaded and _orders_by_time(config):
            why = (f"load_col.inter ({config['load_col']['inter']}) leaves out its {time_field} column" if time_field in names
                   else f"{path.name} has no {time_field} column (its header: {', '.join(names)})")
            raise RecboleMMError(
                f"Dataset '{name}': TIME_FIELD is {time_field}, but {why}; the run orders each user's interactions "
                f"by it. Load it (e.g. load_col: {{inter: [{uid}, {iid}, {time_field}]}}), or set TIME_FIELD: ~ to keep "
                "the file's order."
            )
    for suffix, id_field in (("item", iid), ("user", uid)):
        path = folder / f"{name}.{suffix}"
        load_col = config["load_col"]
        if load_col is not None and suffix not in load_col:
            continue
        if not path.is_file():
            if load_col is not None:
                raise RecboleMMError(f"Dataset '{name}': load_col.{suffix} names columns of {path}, which does not "
                                     f"exist. Remove load_col.{suffix}, or produce the file (dataset_conversion/).")
            continue
        check_file(config, path, suffix, required=[id_field], unique_id=id_field)


def _encoding(config):
    return config["encoding"] or "utf-8"  # RecBole passes None to open(): the locale's, UTF-8 here


def _orders_by_time(config):
    return config["MODEL_TYPE"] == ModelType.SEQUENTIAL or config["eval_args"]["order"] == "TO"


def read_header(config, path):
    """[(field, type)] of an atomic file's first line."""
    try:
        with open(path, encoding=_encoding(config)) as handle:
            head = handle.readline().rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise RecboleMMError(f"{path} is not {_encoding(config)} text ({error.reason} at byte {error.start}); "
                             "re-save it as UTF-8 or set encoding.") from None
    if not head:
        raise RecboleMMError(f"{path} is empty: an atomic file starts with a header line such as "
                             "'user_id:token<TAB>item_id:token<TAB>timestamp:float'. Re-convert the dataset.")
    fields = []
    for entry in head.split(config["field_separator"]):
        field, _, kind = entry.partition(":")
        if not field or kind not in FIELD_TYPES:
            raise RecboleMMError(f"{path}, header: column {entry!r} is not 'name:type' with type one of "
                                 f"{sorted(FIELD_TYPES)} (field_separator is {config['field_separator']!r}). "
                                 "Fix the header line.")
        fields.append((field, kind))
    return fields


def check_file(config, path, suffix, required, unique_id):
    """Check one file; returns the columns RecBole will load from it and all the header's columns."""
    header = read_header(config, path)
    names = [field for field, _ in header]
    load_col, unload_col = config["load_col"], config["unload_col"] or {}
    wanted = None if load_col is None else list(load_col.get(suffix) or [])
    absent = [field for field in wanted or [] if field not in names]
    if absent:
        raise RecboleMMError(f"{path} has no column {', '.join(absent)} (its header: {', '.join(names)}), but "
                             f"load_col.{suffix} names {'them' if len(absent) > 1 else 'it'}. Fix load_col.{suffix} "
                             "(the dataset yaml or your config) or the file's header.")
    loaded = [field for field in names if (wanted is None or field in wanted)
              and field not in (unload_col.get(suffix) or [])]
    for field in required:
        if field and field not in loaded:
            raise RecboleMMError(f"{path}: the id column {field} is not loaded (loaded: {', '.join(loaded)}; header: "
                                 f"{', '.join(names)}). Add it to load_col.{suffix}, or set USER_ID_FIELD / "
                                 "ITEM_ID_FIELD to the file's id column.")
    kinds = dict(header)
    checked = [field for field in loaded if kinds[field] == "float" or field in required or field == unique_id]
    floats = [field for field in checked if kinds[field] == "float"]
    try:  # numbers parsed by the C reader (fast); a text among them is then located on a second, string read
        frame = _read_columns(config, path, checked, kinds, floats)
    except ValueError:
        frame = _read_columns(config, path, checked, kinds, [])
    if frame.empty:
        raise RecboleMMError(f"{path} has a header but no rows. Re-convert the dataset (or fix data_path).")
    line_numbers = _row_lines(config, path, len(header))
    if len(line_numbers) != len(frame):  # a quoted field spanning lines: pandas' rows are not lines
        line_numbers = np.arange(len(frame)) + 2
    for field in checked:
        values = frame[field]
        if kinds[field] == "float":
            numbers = values if values.dtype == np.float64 else pd.to_numeric(values, errors="coerce")
            bad = ~np.isfinite(numbers.to_numpy(dtype=float))
            _refuse(path, field, line_numbers[bad], values[bad], "is not a finite number",
                    "RecBole would silently fill a missing one with the column's mean",
                    f"give every row a number, or leave {field} out of load_col.{suffix}")
        else:
            bad = (values.fillna("") == "").to_numpy()
            _refuse(path, field, line_numbers[bad], values[bad], "is empty",
                    "RecBole would read it as the padding id", "give every row its id")
    if unique_id:
        repeated = frame[unique_id].duplicated(keep="first").to_numpy()
        _refuse(path, unique_id, line_numbers[repeated], frame[unique_id][repeated], "repeats an earlier row's id",
                "which row's values apply would be ambiguous", "keep one row per id")
    return loaded, names


def _row_lines(config, path, n_fields):
    """The line number of each data row (pandas skips blank lines); a row whose field count differs
    from the header's is an error (pandas would shift or drop its values without a word)."""
    separator, lines, wrong = config["field_separator"], [], []
    with open(path, encoding=_encoding(config)) as handle:
        next(handle)
        for number, line in enumerate(handle, 2):
            if line.strip("\r\n"):
                lines.append(number)
                if line.count(separator) != n_fields - 1 and '"' not in line:
                    wrong.append(number)
    if wrong:
        shown = ", ".join(map(str, wrong[:MAX_NAMED_LINES])) + (", ..." if len(wrong) > MAX_NAMED_LINES else "")
        raise RecboleMMError(f"{path}: {len(wrong)} row{'s' if len(wrong) > 1 else ''} (line {shown}) "
                             f"{'have' if len(wrong) > 1 else 'has'} another number of {separator!r}-separated "
                             f"fields than the header's {n_fields}, so its values would land in the wrong columns. "
                             "Fix those lines (a tab inside a text field?).")
    return np.array(lines)


def _read_columns(config, path, fields, kinds, as_numbers):
    """``fields`` of an atomic file as strings (empty cells ""), those in ``as_numbers`` as float64 (empty
    cells NaN); a malformed table is a ``RecboleMMError``, a text in a number column a ValueError."""
    dtype = {f"{field}:{kinds[field]}": (np.float64 if field in as_numbers else str) for field in fields}
    try:
        frame = pd.read_csv(path, sep=config["field_separator"], usecols=list(dtype), dtype=dtype,
                            keep_default_na=False, na_values={name: ["", "nan", "NaN"] for name in dtype
                                                              if dtype[name] is np.float64},
                            encoding=_encoding(config))
    except pd.errors.ParserError as error:
        raise RecboleMMError(f"{path} cannot be read as a {config['field_separator']!r}-separated table "
                             f"({' '.join(str(error).split())}). Fix the lines named.") from None
    frame.columns = fields
    return frame


def _refuse(path, field, lines, values, problem, consequence, fix):
    if len(lines) == 0:
        return
    values = [str(value) for value in list(values)[:MAX_NAMED_LINES]]
    shown = ", ".join(f"line {line} ({value!r})" for line, value in zip(lines[:MAX_NAMED_LINES], values))
    raise RecboleMMError(f"{path}: column {field} {problem} on {len(lines)} row{'s' if len(lines) > 1 else ''}: "
                         f"{shown}{', ...' if len(lines) > MAX_NAMED_LINES else ''}; {consequence}. Fix the file: {fix}.")
