"""Amazon Reviews 2018 / 2014 (reviews + metadata) -> RecBole atomic files for recbole_mm.

    python dataset_conversion/amazon.py --reviews Office_Products_5.json.gz \
        --meta meta_Office_Products.json.gz --dataset Office            # -> ./dataset/Office/

Accepted raw formats (gzip or plain, one record per line):
  2018 reviews  <Category>.json.gz / <Category>_5.json.gz: JSON (reviewerID, asin, overall, unixReviewTime, ...)
  2018 meta     meta_<Category>.json.gz: JSON (asin, title, brand, price "$x", category [..],
                description [..], imageURLHighRes [..], imageURL [..])
  2014 reviews  reviews_<Category>.json.gz / reviews_<Category>_5.json.gz: JSON
  2014 meta     meta_<Category>.json.gz: Python-literal lines (asin, title, brand, price float,
                categories [[..]], description str, imUrl str)
  ratings-only  <Category>.csv (2018: item,user,rating,timestamp) / ratings_<Category>.csv (2014:
                user,item,rating,timestamp; pass --csv_layout 2014), no header; what MMM4Rec starts from
Every line is parsed as JSON first and as a Python literal second, so either year works with either file.

Pipeline: parse -> drop interactions of items without metadata (default) -> chronological order ->
optional dedup of repeated (user, item) -> k-core (default 5/5) -> items sorted by ASIN = item2index rows.
Bad input never stops the run (except when nothing is left): it is counted, the first few line numbers are
kept, and a summary is printed and stored in the manifest. See docs/datasets.md.
"""
import argparse
import ast
import datetime
import gzip
import json
import re
import string
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import (  # noqa: E402
    BadInputReport,
    chronological,
    clean_field,
    conversion_is_current,
    default_data_dir,
    dedup_interactions,
    file_stamp,
    kcore_filter,
    log,
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


def parse_records(path, report, kind):
    """Yield (line_number, dict) for every parseable line; malformed lines are counted and skipped."""
    with open_text(path) as handle:
        lines = tqdm(handle, desc=f"reading {Path(path).name}", unit=" lines", mininterval=2.0, leave=False)
        for line_number, line in enumerate(lines, 1):
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
    with open_text(path) as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.strip().split(",")
            if len(parts) != 4:
                report.add("ratings csv: malformed line (skipped)", f"{name}:{line_number}")
                continue
            record = dict(zip(columns, parts))
            try:
                timestamp, rating = float(record["timestamp"]), float(record["rating"])
            except ValueError:
                report.add("ratings csv: non-numeric rating/timestamp (skipped)", f"{name}:{line_number}")
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
    image_url = ""
    for key in ("imageURLHighRes", "imageURL", "imUrl"):
        value = record.get(key)
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if v), "")
        if value:
            image_url = clean_token(value)
            break
    return {
        "title": clean_field(record.get("title")),
        "brand": clean_field(record.get("brand")),
        "price": price,
        "categories": ", ".join(flat),
        "description": clean_field(record.get("description")),
        "image_url": image_url,
    }


def read_meta(path, report, wanted):
    """Normalised metadata of the ASINs in ``wanted`` (a category's metadata file lists many items nobody
    reviewed; normalising only the reviewed ones saves most of the time)."""
    metas = {}
    seen = set()
    name = Path(path).name
    for line_number, record in parse_records(path, report, "meta"):
        asin = record.get("asin")
        if not asin:
            report.add("meta: no asin (skipped)", f"{name}:{line_number}")
            continue
        asin = clean_token(asin)
        if asin in seen:
            report.add("meta: duplicate asin (first record kept)", f"{name}:{line_number}")
            continue
        seen.add(asin)
        if asin in wanted:
            metas[asin] = normalise_meta(record)
    return metas, len(seen)


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
):
    """Run the conversion; returns (dataset_dir, stats). Skips the work when the manifest says it is done."""
    dataset_dir = Path(output_dir or default_data_dir()) / dataset
    text_template = TextTemplate(*template)
    is_csv = Path(reviews).name.endswith((".csv", ".csv.gz"))
    parameters = {
        "converter": "amazon",
        "reviews": file_stamp(reviews),
        "meta": file_stamp(meta),
        "user_k": user_k,
        "item_k": item_k,
        "dedup": dedup,
        "text_template": {"parts": text_template.parts, "separator": text_template.separator},
        "keep_items_without_meta": keep_items_without_meta,
        "csv_columns": list(csv_columns) if is_csv else None,
    }
    if not force and conversion_is_current(dataset_dir, dataset, parameters):
        log(f"{dataset}: outputs match the manifest, nothing to do (use --force to redo)")
        return dataset_dir, None

    report = BadInputReport()
    inter = read_ratings_csv(reviews, csv_columns, report) if is_csv else read_reviews(reviews, report)
    metas, n_meta_items = read_meta(meta, report, set(inter["item_id"].unique()))
    stats = {"raw_interactions": len(inter), "raw_meta_items": n_meta_items}

    has_meta = inter["item_id"].isin(metas.keys()).to_numpy()
    for item in inter.loc[~has_meta, "item_id"].unique():
        report.add(
            "items without metadata (kept, empty text)" if keep_items_without_meta else "items without metadata (dropped)",
            item,
        )
    if not keep_items_without_meta:
        inter = inter[has_meta]
    stats["interactions_without_meta"] = int((~has_meta).sum())

    inter = chronological(inter)
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

    empty = dict.fromkeys(TEXT_FIELDS, "") | {"image_url": ""}
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
    parser.add_argument("--meta", required=True, help="metadata file meta_<Category>.json.gz")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. Office (files are <name>.inter, ...)")
    parser.add_argument("--output_dir", default=None, help="RecBole data_path to write into (default: $RECBOLE_MM_DATA, else ./dataset)")
    parser.add_argument("--k", type=int, default=None, help="k-core for both users and items (default 5)")
    parser.add_argument("--user_k", type=int, default=5)
    parser.add_argument("--item_k", type=int, default=5)
    parser.add_argument("--dedup", action="store_true", help="keep only the first interaction of each (user, item)")
    parser.add_argument("--text_preset", choices=sorted(TEXT_PRESETS), default="fmrlrec")
    parser.add_argument("--text_template", nargs="+", help='custom parts, e.g. "Title: {title}" "Brand: {brand}"')
    parser.add_argument("--text_separator", default=None, help="separator between template parts")
    parser.add_argument("--keep_items_without_meta", action="store_true",
                        help="keep reviewed items that have no metadata (empty text, no image URL)")
    parser.add_argument("--force", action="store_true", help="redo even when the manifest says outputs are current")
    args = parser.parse_args(argv)
    user_k, item_k = (args.k, args.k) if args.k is not None else (args.user_k, args.item_k)
    convert(args.reviews, args.meta, args.dataset, args.output_dir, user_k, item_k, args.dedup,
            template_from_args(args), args.keep_items_without_meta, args.force,
            CSV_2018_COLUMNS if args.csv_layout == "2018" else CSV_2014_COLUMNS)


if __name__ == "__main__":
    main()
