"""amazon.py on real Amazon 2018 files (reviews without their metadata, metadata without its reviews)
and on small fixtures of the schemas not available as real files (2014 imUrl metadata as Python-literal
lines, 2018 metadata with the ``image`` key). Expected counts are computed here from the raw lines.
"""
import gzip
import json
from collections import Counter

import pytest

from dataset_conversion import amazon
from dataset_conversion.common import load_manifest
from tests.conftest import shared_dataset_dir


@pytest.fixture(scope="module")
def amazon2018():
    return shared_dataset_dir("raw/amazon2018")


def raw_records(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def naive_core(rows, k):
    while True:
        users, items = Counter(u for u, _ in rows), Counter(i for _, i in rows)
        kept = [(u, i) for u, i in rows if users[u] >= k and items[i] >= k]
        if kept == rows:
            return rows
        rows = kept


@pytest.mark.parametrize("name, expected_rows, expected_repeats", [
    ("All_Beauty_5.json.gz", 5269, 1108), ("Appliances_5.json.gz", 2277, 2088)])
def test_real_2018_reviews_without_metadata(amazon2018, tmp_path, name, expected_rows, expected_repeats):
    records = raw_records(amazon2018 / name)
    triples = [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in records]
    distinct = list(dict.fromkeys(triples))  # first occurrence of each (user, item, time)
    assert (len(records), len(triples) - len(distinct)) == (expected_rows, expected_repeats)  # the files' SOURCE.md

    with pytest.raises(ValueError, match="none of the .* reviewed items .* has metadata.*--keep_items_without_meta"):
        amazon.convert(amazon2018 / name, None, "Beauty", tmp_path)

    dataset_dir, stats = amazon.convert(amazon2018 / name, None, "Beauty", tmp_path, user_k=0, item_k=0,
                                        keep_items_without_meta=True)
    assert stats["raw_interactions"] == len(records)
    assert stats["variant_repeats_removed"] == expected_repeats
    assert stats["interactions"] == len(distinct)
    assert (stats["users"], stats["items"]) == (len({u for u, _, _ in distinct}), len({i for _, i, _ in distinct}))
    assert stats["items_without_meta"] == len({i for _, i, _ in triples}) and stats["items_with_text"] == 0
    assert stats["interactions_without_meta"] == len(records)
    bad = load_manifest(dataset_dir, "Beauty")["conversion"]["bad_input"]
    assert bad["items without metadata (kept, empty text)"]["count"] == stats["items_without_meta"]
    inter = (dataset_dir / "Beauty.inter").read_text().splitlines()[1:]
    assert Counter(tuple(line.split("\t")[:2]) for line in inter) == Counter((u, i) for u, i, _ in distinct)

    # --dedup also merges one user's reviews of an item at different times; then a 3-core (Appliances_5 has
    # no 5-core left once the repeats are gone: they were what made it a "5-core" file)
    _, deduped = amazon.convert(amazon2018 / name, None, "Beauty", tmp_path, user_k=3, item_k=3,
                                keep_items_without_meta=True, dedup=True)
    pairs = list(dict.fromkeys((u, i) for u, i, _ in sorted(distinct, key=lambda t: (t[0], t[2]))))
    assert deduped["duplicates_removed"] == len(distinct) - len(pairs)
    assert deduped["interactions"] == len(naive_core(pairs, 3)) > 0

    # keeping the variant repeats is one switch away
    _, kept = amazon.convert(amazon2018 / name, None, "Beauty", tmp_path, user_k=0, item_k=0,
                             keep_items_without_meta=True, keep_variant_repeats=True)
    assert kept["interactions"] == len(records) and kept["variant_repeats_removed"] == 0


def test_real_2018_metadata_with_repeated_asin_rows(amazon2018, tmp_path):
    meta_path = amazon2018 / "meta_Magazine_Subscriptions.json.gz"
    records = raw_records(meta_path)
    first = {}
    for record in records:
        first.setdefault(record["asin"], record)
    repeated = len(records) - len(first)
    assert (len(records), len(first), repeated) == (3385, 2320, 1065)  # the file's SOURCE.md
    with_high_res = {a for a, r in first.items() if any(r.get("imageURLHighRes") or [])}
    with_any = {a for a, r in first.items() if any(r.get("imageURLHighRes") or []) or any(r.get("imageURL") or [])}

    # reviews for every ASIN of the metadata (the real metadata has no matching review file)
    asins = sorted(first)
    lines = [json.dumps({"reviewerID": f"U{u}", "asin": asin, "overall": 5.0, "unixReviewTime": 1_500_000_000 + u})
             for n, asin in enumerate(asins) for u in (n % 7, n % 7 + 7)]
    with gzip.open(tmp_path / "Magazine_Subscriptions.json.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    dataset_dir, stats = amazon.convert(tmp_path / "Magazine_Subscriptions.json.gz", meta_path, "Magazines", tmp_path,
                                        user_k=0, item_k=0)
    assert (stats["meta_rows"], stats["meta_items"], stats["meta_repeated_rows"]) == (len(records), len(first), repeated)
    assert stats["meta_repeated_rows_differing"] == sum(
        json.dumps(r, sort_keys=True) != json.dumps(first[r["asin"]], sort_keys=True) for r in records)
    assert stats["items"] == len(first) and stats["items_without_meta"] == 0
    assert stats["items_with_image_url"] == len(with_any)
    assert stats["image_url_keys"].get("imageURLHighRes", 0) == len(with_high_res)
    assert stats["items_with_text"] == len(first)
    bad = load_manifest(dataset_dir, "Magazines")["conversion"]["bad_input"]
    assert sum(v["count"] for k, v in bad.items() if k.startswith("meta: repeated asin row")) == repeated
    items = {line.split("\t")[0]: line.split("\t") for line in (dataset_dir / "Magazines.item").read_text().splitlines()[1:]}
    sample = sorted(with_high_res)[0]
    assert items[sample][-1] == first[sample]["imageURLHighRes"][0]  # image_url: the first high-resolution URL


def test_image_url_under_every_metadata_schema(tmp_path):
    """2018 imageURLHighRes / imageURL / image (other categories), 2014 imUrl (Python-literal lines)."""
    items = {"B0HIGHRES0": {"imageURLHighRes": ["https://x/hi.jpg"], "imageURL": ["https://x/lo.jpg"]},
             "B0LOWRES00": {"imageURL": ["", "https://x/lo2.jpg"]},
             "B0IMAGEKEY": {"image": ["https://x/img.jpg"]},
             "B0NOIMAGE0": {"image": []}}
    meta = [json.dumps({"asin": asin, "title": f"Thing {asin}", **fields}) for asin, fields in items.items()]
    meta.append(repr({"asin": "B0IMURL000", "title": "Old thing", "imUrl": "http://ecx/old.jpg",
                      "categories": [["Office Products"]], "price": 2.5}))  # 2014: a Python literal, not JSON
    with gzip.open(tmp_path / "meta.json.gz", "wt") as handle:
        handle.write("\n".join(meta) + "\n")
    asins = list(items) + ["B0IMURL000"]
    reviews = [json.dumps({"reviewerID": f"U{u}", "asin": a, "overall": 4, "unixReviewTime": 1_000_000 + u})
               for a in asins for u in range(3)]
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as handle:
        handle.write("\n".join(reviews) + "\n")
    dataset_dir, stats = amazon.convert(tmp_path / "reviews.json.gz", tmp_path / "meta.json.gz", "Schemas", tmp_path,
                                        user_k=0, item_k=0)
    urls = {line.split("\t")[0]: line.split("\t")[-1] for line in (dataset_dir / "Schemas.item").read_text().splitlines()[1:]}
    assert urls == {"B0HIGHRES0": "https://x/hi.jpg", "B0LOWRES00": "https://x/lo2.jpg", "B0IMAGEKEY": "https://x/img.jpg",
                    "B0NOIMAGE0": "", "B0IMURL000": "http://ecx/old.jpg"}
    assert stats["image_url_keys"] == {"imageURLHighRes": 1, "imageURL": 1, "image": 1, "imUrl": 1}
    assert stats["items_with_image_url"] == 4
