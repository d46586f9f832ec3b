"""Shared pieces of the converters: k-core filter, atomic file writing, manifest, bad-input report.

Output contract (read by recbole_mm.data's feature hook), for a dataset ``D`` in ``<data_path>/D/``:
    D.inter        user_id:token item_id:token rating:float timestamp:float, grouped by user, chronological
    D.item         item_id:token + text fields (:token_seq) + image_url:token when known
    D.item2index   "<item token>\t<row>", rows 0..N-1 (the row order of every feature file)
    D.<m>.npy      float32 (N, D) per modality m, row k = item whose item2index row is k, no padding row
    D.<m>.mask.npy bool (N,) presence; False rows are zero in D.<m>.npy
    D.manifest.json conversion parameters/counts/bad-input summary and one entry per encoded modality,
                   with the sha256 of every output file
"""
import hashlib
import html
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_mm.utils.atomic import atomic_path, write_text_atomic

MANIFEST_VERSION = 1


def default_data_dir():
    """Where converters write when --output_dir is not given, and runs read when --data_path is not:
    $RECBOLE_MM_DATA, else ./dataset (recbole_mm.config.default_data_path, the same rule)."""
    return Path(os.environ.get("RECBOLE_MM_DATA") or "dataset")


INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


# --------------------------------------------------------------------------------------------------
# k-core filtering
# --------------------------------------------------------------------------------------------------
def kcore_filter(inter, user_k=5, item_k=5, user_field="user_id", item_field="item_id"):
    """Largest sub-dataset in which every user has >= user_k and every item >= item_k interactions.

    Repeated (user, item) interactions each count (dedup first if they should not). Iterated removal
    converges to the unique maximal such subgraph (the bipartite (user_k, item_k)-core).
    Returns the filtered frame (original index and row order kept) and the number of rounds.
    """
    keep = np.ones(len(inter), dtype=bool)
    users = inter[user_field].to_numpy()
    items = inter[item_field].to_numpy()
    rounds = 0
    while True:
        rounds += 1
        user_counts = pd.Series(users[keep]).value_counts()
        item_counts = pd.Series(items[keep]).value_counts()
        bad_users = user_counts.index[user_counts.to_numpy() < user_k]
        bad_items = item_counts.index[item_counts.to_numpy() < item_k]
        if len(bad_users) == 0 and len(bad_items) == 0:
            return inter[keep], rounds
        keep &= ~(pd.Series(users).isin(bad_users).to_numpy() | pd.Series(items).isin(bad_items).to_numpy())


def kcore_filter_reference(pairs, user_k=5, item_k=5):
    """Slow, obviously-correct twin of kcore_filter on a list of (user, item): kept positions."""
    alive = list(range(len(pairs)))
    while True:
        user_count = Counter(pairs[i][0] for i in alive)
        item_count = Counter(pairs[i][1] for i in alive)
        survivors = [i for i in alive if user_count[pairs[i][0]] >= user_k and item_count[pairs[i][1]] >= item_k]
        if len(survivors) == len(alive):
            return survivors
        alive = survivors


def chronological(inter, user_field="user_id", time_field="timestamp"):
    """Rows grouped by user, by timestamp inside a user; equal timestamps keep their input order."""
    order = np.arange(len(inter))
    sort_keys = pd.DataFrame({"u": inter[user_field].to_numpy(), "t": inter[time_field].to_numpy(), "o": order})
    sorted_positions = sort_keys.sort_values(["u", "t", "o"]).index.to_numpy()
    return inter.iloc[sorted_positions].reset_index(drop=True)


def dedup_interactions(inter, user_field="user_id", item_field="item_id"):
    """Keep the earliest interaction of every (user, item) pair (the input must be chronological)."""
    return inter.drop_duplicates([user_field, item_field], keep="first").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Text cleaning for token_seq fields
# --------------------------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"\s+")
_HTML_TAG = re.compile(r"<[^>]{0,200}>")


def clean_field(value):
    """One line of text safe for a tab-separated RecBole atomic file.

    HTML tags (2018 descriptions) become spaces and entities are unescaped. Tabs/newlines would break the row; a leading '"' would make pandas' csv reader (RecBole reads atomic
    files with read_csv) start a quoted field and swallow following rows, so every '"' becomes "''".
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_field(v) for v in value)
    text = str(value)
    text = html.unescape(_HTML_TAG.sub(" ", text))
    text = text.replace('"', "''")
    return _WHITESPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------------
# Bad-input bookkeeping
# --------------------------------------------------------------------------------------------------
class BadInputReport:
    """Counts each kind of bad input, remembers the first few locations, prints a summary."""

    def __init__(self, keep_examples=5):
        self.keep_examples = keep_examples
        self.counts = Counter()
        self.examples = defaultdict(list)

    def add(self, kind, where=None):
        self.counts[kind] += 1
        if where is not None and len(self.examples[kind]) < self.keep_examples:
            self.examples[kind].append(where)

    def as_dict(self):
        return {kind: {"count": count, "first": self.examples.get(kind, [])} for kind, count in sorted(self.counts.items())}

    def summary(self, title="bad input"):
        if not self.counts:
            return f"{title}: none"
        lines = [f"{title}:"]
        for kind, count in sorted(self.counts.items()):
            first = self.examples.get(kind)
            lines.append(f"  {kind}: {count}" + (f" (first: {', '.join(map(str, first))})" if first else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, hashes, manifest
# --------------------------------------------------------------------------------------------------
def save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def write_table(path, header, rows):
    """Tab-separated file with a header line; fields must already be clean (clean_field)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write("\t".join(header) + "\n")
            for row in rows:
                handle.write("\t".join(str(v) for v in row) + "\n")


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path):
    """Cheap identity of a (possibly huge, raw) input file: name, size, mtime."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def manifest_path(dataset_dir, dataset):
    return Path(dataset_dir) / f"{dataset}.manifest.json"


def load_manifest(dataset_dir, dataset):
    path = manifest_path(dataset_dir, dataset)
    if not path.exists():
        return {"manifest_version": MANIFEST_VERSION, "dataset": dataset, "conversion": None, "features": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def save_manifest(dataset_dir, dataset, manifest):
    write_text_atomic(manifest_path(dataset_dir, dataset), json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def outputs_match(dataset_dir, hashes):
    """True when every file named in ``hashes`` exists in dataset_dir with that sha256."""
    for name, digest in hashes.items():
        path = Path(dataset_dir) / name
        if not path.exists() or sha256_file(path) != digest:
            return False
    return bool(hashes)


def hash_outputs(dataset_dir, names):
    return {name: sha256_file(Path(dataset_dir) / name) for name in names}


def conversion_is_current(dataset_dir, dataset, parameters):
    """Re-running a conversion with identical parameters/inputs whose outputs are intact is a no-op."""
    previous = load_manifest(dataset_dir, dataset).get("conversion")
    return bool(previous) and previous.get("parameters") == parameters and outputs_match(dataset_dir, previous["outputs"])


def claim_dataset_dir(dataset_dir, dataset, source, force=False):
    """Refuse to overwrite a dataset folder converted from another source (e.g. a ReChorus ``Office``
    folder with the Amazon 2018 files) unless ``force``; when forced, the other conversion's outputs
    and features are removed first so no file of the old source survives next to the new ones.

    ``source`` is the converter's name as recorded in the manifest (``conversion.parameters.converter``).
    """
    manifest = load_manifest(dataset_dir, dataset)
    previous = (manifest.get("conversion") or {}).get("parameters", {}).get("converter")
    if previous is None or previous == source:
        return
    if not force:
        raise ValueError(
            f"{manifest_path(dataset_dir, dataset)}: the folder holds dataset '{dataset}' converted by the"
            f" '{previous}' converter; this is the '{source}' converter. Pick another --dataset name (or"
            " --output_dir), or pass --force to replace the old conversion and its feature files."
        )
    entries = [manifest["conversion"]] + list(manifest.get("features", {}).values())
    for entry in entries:
        for name in entry.get("outputs", {}):
            (Path(dataset_dir) / name).unlink(missing_ok=True)
    manifest_path(dataset_dir, dataset).unlink()
    log(f"{dataset}: removed the '{previous}' conversion (--force)")


def write_atomic_dataset(dataset_dir, dataset, inter, items, item_fields, parameters, stats, report,
                         with_rating=True, extra_outputs=()):
    """Write D.inter, D.item, D.item2index and the conversion part of the manifest.

    inter: frame with user_id, item_id, rating, timestamp (already filtered and chronological);
           with_rating=False writes no rating column (implicit feedback: nothing to invent).
    extra_outputs: names of further files the converter already wrote into dataset_dir (hashed too).
    items: frame indexed by item token with the columns named in item_fields (name, atomic type);
           rows in item2index order. Features written later keep the encoders' entries only when the
           item2index they were computed for is unchanged (encode_features checks its sha256).
    """
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    columns = [inter["user_id"], inter["item_id"], inter["timestamp"].map(_format_number)]
    if with_rating:
        columns.insert(2, inter["rating"].map(_format_number))
    write_table(
        dataset_dir / f"{dataset}.inter",
        INTER_HEADER if with_rating else [field for field in INTER_HEADER if not field.startswith("rating")],
        zip(*columns),
    )
    item_header = ["item_id:token"] + [f"{name}:{kind}" for name, kind in item_fields]
    write_table(
        dataset_dir / f"{dataset}.item",
        item_header,
        ([token] + [items.at[token, name] for name, _ in item_fields] for token in items.index),
    )
    write_text_atomic(dataset_dir / f"{dataset}.item2index", "".join(f"{token}\t{row}\n" for row, token in enumerate(items.index)))
    outputs = [f"{dataset}.inter", f"{dataset}.item", f"{dataset}.item2index", *extra_outputs]
    manifest = load_manifest(dataset_dir, dataset)
    drop_stale_features(dataset_dir, manifest, sha256_file(dataset_dir / f"{dataset}.item2index"))
    manifest["conversion"] = {
        "parameters": parameters,
        "stats": stats,
        "bad_input": report.as_dict(),
        "outputs": hash_outputs(dataset_dir, outputs),
    }
    save_manifest(dataset_dir, dataset, manifest)


def drop_stale_features(dataset_dir, manifest, item2index_sha256):
    """Feature files encoded for another item list would be read with the wrong rows: remove them."""
    for modality, entry in list(manifest.get("features", {}).items()):
        if entry.get("key", {}).get("item2index_sha256") == item2index_sha256:
            continue
        for name in entry.get("outputs", {}):
            (Path(dataset_dir) / name).unlink(missing_ok=True)
        del manifest["features"][modality]
        log(f"removed the '{modality}' features: the item list changed; re-run encode_features.py")


def _format_number(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def read_item2index(dataset_dir, dataset):
    """Item tokens in row order, checked to be rows 0..N-1."""
    path = Path(dataset_dir) / f"{dataset}.item2index"
    tokens, line_of_token = {}, {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{line_number}: expected '<item token>\\t<row>', got {line!r}")
            if parts[0] in line_of_token:
                raise ValueError(f"{path}:{line_number}: item {parts[0]!r} is listed again (first on line "
                                 f"{line_of_token[parts[0]]}); regenerate it with the converter")
            if int(parts[1]) in tokens:
                raise ValueError(f"{path}:{line_number}: row {parts[1]} is given twice; regenerate it with the converter")
            line_of_token[parts[0]] = line_number
            tokens[int(parts[1])] = parts[0]
    if not tokens:
        raise ValueError(f"{path} is empty; run the dataset's converter first (it writes one line per item)")
    if sorted(tokens) != list(range(len(tokens))):
        raise ValueError(f"{path}: rows must be exactly 0..N-1; regenerate it with the converter")
    return [tokens[row] for row in range(len(tokens))]


def read_item_table(dataset_dir, dataset):
    """The D.item file as {field name: {token: text}} (no csv quoting: the file is written by us)."""
    path = Path(dataset_dir) / f"{dataset}.item"
    with open(path, encoding="utf-8") as handle:
        header = [field.split(":")[0] for field in handle.readline().rstrip("\n").split("\t")]
        if header[0] != "item_id":
            raise ValueError(f"{path}: first column must be item_id:token, got {header[0]!r}")
        columns = {name: {} for name in header[1:]}
        line_of_item = {}
        for line_number, line in enumerate(handle, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                raise ValueError(f"{path}:{line_number}: {len(parts)} fields, header has {len(header)}")
            if parts[0] in line_of_item:
                raise ValueError(f"{path}:{line_number}: item {parts[0]!r} is listed again (first on line "
                                 f"{line_of_item[parts[0]]}), so its fields are ambiguous; regenerate it with the converter")
            line_of_item[parts[0]] = line_number
            for name, value in zip(header[1:], parts[1:]):
                columns[name][parts[0]] = value
    return columns


def log(message):
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def run_converter(main, argv=None):
    """Run a converter's ``main``: bad input (a missing, unreadable or malformed file, a value that
    cannot work) ends in one paragraph on stderr and exit status 2, never a traceback."""
    program = Path(sys.argv[0]).name
    try:
        main(argv)
    except (ValueError, OSError, ImportError, EOFError) as error:  # converters raise these with the input and fix
        message = " ".join(str(error).split())
        if isinstance(error, FileNotFoundError) and error.filename:
            message = f"{error.filename} not found ({error.strerror}): check the path."
        elif isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror or message}."
        print(f"{program}: error: {message}", file=sys.stderr)
        return 2
    return 0
