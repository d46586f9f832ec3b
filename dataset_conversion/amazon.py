"""Amazon Reviews 2018 / 2014 (reviews + metadata) -> RecBole atomic files for recbole_mm.

    python dataset_conversion/amazon.py --reviews Office_Products_5.json.gz \
        --meta meta_Office_Products.json.gz --dataset Office_Products   # -> ./dataset/Office_Products/
    python dataset_conversion/amazon.py --reviews All_Beauty_5.json.gz --keep_items_without_meta \
        --dataset All_Beauty                                            # reviews only: items without text

Accepted raw formats (gzip or plain, one record per line):
  2018 reviews  <Category>.json.gz / <Category>_5.json.gz: JSON (reviewerID, asin, overall, unixReviewTime, ...)
  2018 meta     meta_<Category>.json.gz: JSON (asin, title, brand, price "$x", category [..],
                description [..], image URLs in imageURLHighRes [..] / imageURL [..], or image [..]
                in other categories); some files repeat an ASIN's row (counted, first kept)
  2014 reviews  reviews_<Category>.json.gz / reviews_<Category>_5.json.gz: JSON
  2014 meta     meta_<Category>.json.gz: Python-literal lines (asin, title, brand, price float,
                categories [[..]], description str, imUrl str)
  ratings-only  <Category>.csv (2018: item,user,rating,timestamp) / ratings_<Category>.csv (2014:
                user,item,rating,timestamp; pass --csv_layout 2014), no header; what MMM4Rec starts from
Every line is parsed as JSON first and as a Python literal second, so either year works with either file.

Pipeline: parse -> drop interactions of items without metadata (default; --keep_items_without_meta keeps
them with empty text; without --meta every item is such an item) -> chronological order -> drop rows that
repeat an earlier row's (user, item, time) (default: the 2018 dumps list one review once per product
variant, e.g. 1,108 of All_Beauty_5's 5,269 rows; --keep_variant_repeats keeps them) -> optional --dedup of
repeated (user, item) at different times (earliest kept) -> k-core (default 5/5) -> items sorted by ASIN =
item2index rows. The manifest's stats count every step.
Bad rows never stop the run (a damaged gzip file, or nothing left, does): they are counted, the first few
line numbers are kept, and a summary is printed and stored in the manifest. See docs/datasets.md.
"""
import argparse
import ast
import datetime
import gzip
import json
import re
import math
import string
import sys
import zlib
from pathlib import Path

import pandas as pd
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    chronological,
    claim_dataset_dir,
    clean_field,
    conversion_is_current,
    dedup_interactions,
    default_data_dir,
    file_stamp,
    kcore_filter,
    log,
    run_converter,
    write_atomic_dataset,
)

# Text template presets: (parts, separator). A part is dropped when all of its fields are empty, so an
# item without a brand never reads "Brand: ;".
TEXT_PRESETS = {
    # fMRLRec (sec. 3.3.1): Text_i = Title_i + Price_i + Brand_i + Categories_i
    "fmrlrec": (["Title: {title}", "Price: {price}", "Brand: {brand}", "Categories: {categories}"], "; "),
    # MMM4Rec's preprocessing code (AlwaysFHao/MMM4Rec, process_item/utils._parse_text): title, brand, description
    "mmm4rec": (["Title: {title}", "Brand: {brand}", "Description: {description}"], " ; "),
    # UniSRec / MISSRec / the Scientific benchmark's .text: "title. categories. brand."
    "unisrec": (["{title}", "{categories}", "{brand}"], ". "),
}
TEXT_FIELDS = ("title", "brand", "price", "categories", "description")
ITEM_FIELDS = [(name, "token_seq") for name in TEXT_FIELDS] + [("text", "token_seq"), ("image_url", "token")]
CSV_2018_COLUMNS = ("item", "user", "rating", "timestamp")
CSV_2014_COLUMNS = ("user", "item", "rating", "timestamp")
SOURCE = "amazon"
# Where the metadata keeps image URLs, best first: 2018 (imageURLHighRes, imageURL; image in other
# categories), 2014 (imUrl).
IMAGE_KEYS = ("imageURLHighRes", "imageURL", "image", "imUrl")
_PRICE = re.compile(r"^\$?\s?\d[\d,]*(\.\d+)?(\s*-\s*\$?\s?\d[\d,]*(\.\d+)?)?$")


class TextTemplate:
    def __init__(self, parts, separator):
        self.parts = list(parts)
        self.separator = separator
        for part in self.parts:
            unknown = {name for _, name, _, _ in string.Formatter().parse(part) if name} - set(TEXT_FIELDS)
            if unknown:
                raise ValueError(f"text template part {part!r} uses unknown field(s) {sorted(unknown)}; known: {TEXT_FIELDS}")

    def render(self, fields):
        rendered = []
        for part in self.parts:
            names = [name for _, name, _, _ in string.Formatter().parse(part) if name]
            if names and all(not fields.get(name) for name in names):
                continue
            rendered.append(part.format(**{name: fields.get(name, "") for name in TEXT_FIELDS}))
        return self.separator.join(rendered)


def open_text(path):
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def numbered_lines(path, desc=None):
    """(line number, line) of a plain or gzipped file; a damaged gzip is an error naming the file."""
    try:
        with open_text(path) as handle:
            lines = tqdm(handle, desc=desc, unit=" lines", mininterval=2.0, leave=False, disable=desc is None)
            yield from enumerate(lines, 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: damaged or truncated gzip file ({type(error).__name__}: {error}); download it "
                         "again (or gunzip it and pass the plain file)") from None


def parse_records(path, report, kind):
    """Yield (line_number, dict) for every parseable line; malformed lines are counted and skipped."""
    for line_number, line in numbered_lines(path, f"reading {Path(path).name}"):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            try:
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                report.add(f"{kind}: malformed line (skipped)", f"{Path(path).name}:{line_number}")
                continue
        if not isinstance(record, dict):
            report.add(f"{kind}: line is not an object (skipped)", f"{Path(path).name}:{line_number}")
            continue
        yield line_number, record


def review_timestamp(record):
    """unixReviewTime, else reviewTime 'MM DD, YYYY' read as UTC midnight, else None."""
    value = record.get("unixReviewTime")
    if value not in (None, ""):
        try:
            if math.isfinite(float(value)):
                return float(value)
        except (TypeError, ValueError):
            pass
    text = record.get("reviewTime")
    if text:
        try:
            day = datetime.datetime.strptime(str(text).strip(), "%m %d, %Y")
            return float(day.replace(tzinfo=datetime.timezone.utc).timestamp())
        except ValueError:
            pass
    return None


def read_reviews(path, report):
    rows = []
    name = Path(path).name
    for line_number, record in parse_records(path, report, "reviews"):
        user, item = record.get("reviewerID"), record.get("asin")
        if not user or not item:
            report.add("reviews: no reviewerID/asin (skipped)", f"{name}:{line_number}")
            continue
        timestamp = review_timestamp(record)
        if timestamp is None:
            report.add("reviews: no usable unixReviewTime/reviewTime (skipped)", f"{name}:{line_number}")
            continue
        try:
            rating = float(record["overall"])
            if not math.isfinite(rating):
                raise ValueError(rating)
        except (KeyError, TypeError, ValueError):
            report.add("reviews: no numeric 'overall' rating (kept, rating 0)", f"{name}:{line_number}")
            rating = 0.0
        rows.append((clean_token(user), clean_token(item), rating, timestamp))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def read_ratings_csv(path, columns, report):
    """Ratings-only files: 2018 '<Category>.csv' (item,user,rating,timestamp), 2014 'ratings_<Category>.csv'
    (user,item,rating,timestamp); no header. ``columns`` names the four columns in file order."""
    rows = []
    name = Path(path).name
    for line_number, line in numbered_lines(path):
        parts = line.strip().split(",")
        if len(parts) != 4:
            report.add("ratings csv: malformed line (skipped)", f"{name}:{line_number}")
            continue
        record = dict(zip(columns, parts))
        try:
            timestamp, rating = float(record["timestamp"]), float(record["rating"])
            if not (math.isfinite(timestamp) and math.isfinite(rating)):
                raise ValueError(record)
        except ValueError:
            report.add("ratings csv: non-numeric or non-finite rating/timestamp (skipped)", f"{name}:{line_number}")
            continue
        if not record["user"] or not record["item"]:
            report.add("ratings csv: empty user/item (skipped)", f"{name}:{line_number}")
            continue
        rows.append((clean_token(record["user"]), clean_token(record["item"]), rating, timestamp))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def clean_token(value):
    return "_".join(str(value).split())


def normalise_meta(record):
    """2018 and 2014 metadata -> {title, brand, price, categories, description, image_url}."""
    categories = record.get("category") or record.get("categories") or []
    flat = []
    for entry in categories:
        for name in entry if isinstance(entry, (list, tuple)) else [entry]:
            name = clean_field(name)
            if name and name not in flat:
                flat.append(name)
    price = record.get("price")
    price = "" if price in (None, "") else clean_field(f"${price:.2f}" if isinstance(price, (int, float)) else price)
    if price and not _PRICE.match(price):
        price = ""  # 2018 price fields often hold scraped CSS/HTML instead of a price
    image_url, image_key = "", ""
    for key in IMAGE_KEYS:
        value = record.get(key)
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if isinstance(v, str) and v.strip()), "")
        if isinstance(value, str) and value.strip():
            image_url, image_key = clean_token(value), key
            break
    return {
        "title": clean_field(record.get("title")),
        "brand": clean_field(record.get("brand")),
        "price": price,
        "categories": ", ".join(flat),
        "description": clean_field(record.get("description")),
        "image_url": image_url,
        "image_key": image_key,
    }


def read_meta(path, report, wanted):
    """Normalised metadata of the ASINs in ``wanted`` (a category's metadata file lists many items nobody
    reviewed; normalising only the reviewed ones saves most of the time).

    Returns (metas, counts): counts of rows, distinct ASINs, repeated-ASIN rows and, among those, rows
    that differ from the ASIN's first row (the first is kept either way)."""
    metas = {}
    first_row = {}
    counts = {"meta_rows": 0, "meta_items": 0, "meta_repeated_rows": 0, "meta_repeated_rows_differing": 0}
    name = Path(path).name
    for line_number, record in parse_records(path, report, "meta"):
        counts["meta_rows"] += 1
        asin = record.get("asin")
        if not asin:
            report.add("meta: no asin (skipped)", f"{name}:{line_number}")
            continue
        asin = clean_token(asin)
        fingerprint = json.dumps(record, sort_keys=True, default=str)
        if asin in first_row:
            counts["meta_repeated_rows"] += 1
            differs = fingerprint != first_row[asin]
            counts["meta_repeated_rows_differing"] += differs
            report.add("meta: repeated asin row, differing (first row kept)" if differs
                       else "meta: repeated asin row, identical (first row kept)", f"{name}:{line_number}")
            continue
        first_row[asin] = fingerprint
        if asin in wanted:
            metas[asin] = normalise_meta(record)
    counts["meta_items"] = len(first_row)
    return metas, counts


def drop_variant_repeats(inter):
    """Remove rows repeating an earlier row's (user, item, timestamp): the 2018 dumps list one review
    once per product variant. Returns (frame, rows removed)."""
    kept = inter.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first")
    return kept.reset_index(drop=True), len(inter) - len(kept)


def convert(
    reviews,
    meta,
    dataset,
    output_dir=None,
    user_k=5,
    item_k=5,
    dedup=False,
    template=TEXT_PRESETS["fmrlrec"],
    keep_items_without_meta=False,
    force=False,
    csv_columns=CSV_2018_COLUMNS,
    keep_variant_repeats=False,
):
    """Run the conversion; returns (dataset_dir, stats). Skips the work when the manifest says it is done.

    ``meta`` may be None (a review file without its metadata file): then every item lacks metadata, and
    keep_items_without_meta=True is needed to keep any."""
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    text_template = TextTemplate(*template)
    is_csv = Path(reviews).name.endswith((".csv", ".csv.gz"))
    parameters = {
        "converter": "amazon",
        "reviews": file_stamp(reviews),
        "meta": file_stamp(meta) if meta is not None else None,
        "user_k": user_k,
        "item_k": item_k,
        "dedup": dedup,
        "text_template": {"parts": text_template.parts, "separator": text_template.separator},
        "keep_items_without_meta": keep_items_without_meta,
        "csv_columns": list(csv_columns) if is_csv else None,
        "keep_variant_repeats": keep_variant_repeats,
    }
    claim_dataset_dir(dataset_dir, dataset, SOURCE, force)
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    inter = read_ratings_csv(reviews, csv_columns, report) if is_csv else read_reviews(reviews, report)
    if meta is not None:
        metas, meta_counts = read_meta(meta, report, set(inter["item_id"].unique()))
    else:
        metas, meta_counts = {}, {"meta_rows": 0, "meta_items": 0}
    stats = {"raw_interactions": len(inter), "raw_meta_items": meta_counts["meta_items"], **meta_counts}
    if not metas and not keep_items_without_meta:
        raise ValueError(
            f"{meta or 'no --meta'}: none of the {inter['item_id'].nunique()} reviewed items of {reviews} has metadata,"
            " so every interaction would be dropped; pass the matching meta_<Category> file, or"
            " --keep_items_without_meta to keep the items without text"
        )

    has_meta = inter["item_id"].isin(metas.keys()).to_numpy()
    for item in inter.loc[~has_meta, "item_id"].unique():
        report.add(
            "items without metadata (kept, empty text)" if keep_items_without_meta else "items without metadata (dropped)",
            item,
        )
    stats["items_without_meta"] = int(inter.loc[~has_meta, "item_id"].nunique())
    stats["interactions_without_meta"] = int((~has_meta).sum())
    if not keep_items_without_meta:
        inter = inter[has_meta]

    inter = chronological(inter)
    stats["variant_repeats_removed"] = 0
    if not keep_variant_repeats:
        inter, stats["variant_repeats_removed"] = drop_variant_repeats(inter)
    if dedup:
        before = len(inter)
        inter = dedup_interactions(inter)
        stats["duplicates_removed"] = before - len(inter)
    inter, rounds = kcore_filter(inter, user_k, item_k)
    inter = inter.reset_index(drop=True)
    if inter.empty:
        raise ValueError(
            f"{reviews}: no interaction survives the {user_k}/{item_k}-core filter"
            f" (parsed {stats['raw_interactions']}); lower --user_k/--item_k or check the inputs"
        )
    stats.update(
        kcore_rounds=rounds,
        users=int(inter["user_id"].nunique()),
        items=int(inter["item_id"].nunique()),
        interactions=len(inter),
    )

    empty = dict.fromkeys(TEXT_FIELDS, "") | {"image_url": "", "image_key": ""}
    item_rows = {}
    for token in sorted(inter["item_id"].unique()):
        fields = metas.get(token, empty)
        if token in metas and not fields["title"]:
            report.add("kept items with empty title", token)
        text = clean_field(text_template.render(fields))
        if not text:
            report.add("kept items with empty text (text mask False)", token)
        item_rows[token] = {**{name: fields[name] for name in TEXT_FIELDS}, "text": text, "image_url": fields["image_url"]}
    items = pd.DataFrame.from_dict(item_rows, orient="index")
    stats["items_with_image_url"] = int((items["image_url"] != "").sum())
    image_keys = [metas[token]["image_key"] for token in items.index if token in metas]
    stats["image_url_keys"] = {key: image_keys.count(key) for key in IMAGE_KEYS if key in image_keys}
    stats["items_with_text"] = int((items["text"] != "").sum())

    write_atomic_dataset(dataset_dir, dataset, inter, items, ITEM_FIELDS, parameters, stats, report)
    log(f"{dataset}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions"
        f" ({stats['items_with_image_url']} items with an image URL) -> {dataset_dir}")
    log(report.summary(f"{dataset}: bad input"))
    return dataset_dir, stats


def template_from_args(args):
    if args.text_template:
        return args.text_template, args.text_separator if args.text_separator is not None else "; "
    parts, separator = TEXT_PRESETS[args.text_preset]
    return parts, args.text_separator if args.text_separator is not None else separator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", required=True,
                        help="reviews file (.json.gz/.json, 2018 or 2014) or ratings-only .csv/.csv.gz")
    parser.add_argument("--csv_layout", choices=["2018", "2014"], default="2018",
                        help="ratings-only csv column order: 2018 item,user,rating,time; 2014 user,item,rating,time")
    parser.add_argument("--meta", default=None,
                        help="metadata file meta_<Category>.json.gz (omit for reviews only: needs --keep_items_without_meta)")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. Office (files are <name>.inter, ...)")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path to write into (default: $RECBOLE_MM_DATA, else ./dataset)")
    parser.add_argument("--k", type=int, default=None, help="k-core for both users and items (default 5)")
    parser.add_argument("--user_k", type=int, default=5)
    parser.add_argument("--item_k", type=int, default=5)
    parser.add_argument("--dedup", action="store_true", help="keep only the first interaction of each (user, item)")
    parser.add_argument("--keep_variant_repeats", action="store_true",
                        help="keep rows repeating an earlier (user, item, time) (default: dropped, counted)")
    parser.add_argument("--text_preset", choices=sorted(TEXT_PRESETS), default="fmrlrec")
    parser.add_argument("--text_template", nargs="+", help='custom parts, e.g. "Title: {title}" "Brand: {brand}"')
    parser.add_argument("--text_separator", default=None, help="separator between template parts")
    parser.add_argument("--keep_items_without_meta", action="store_true",
                        help="keep reviewed items that have no metadata (empty text, no image URL)")
    parser.add_argument("--force", action="store_true",
                        help="redo even when current; replace a folder converted from another source")
    args = parser.parse_args(argv)
    user_k, item_k = (args.k, args.k) if args.k is not None else (args.user_k, args.item_k)
    convert(args.reviews, args.meta, args.dataset, args.output_dir, user_k, item_k, args.dedup,
            template_from_args(args), args.keep_items_without_meta, args.force,
            CSV_2018_COLUMNS if args.csv_layout == "2018" else CSV_2014_COLUMNS, args.keep_variant_repeats)


if __name__ == "__main__":
    sys.exit(run_converter(main))
