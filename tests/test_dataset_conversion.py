"""dataset_conversion without the encode extra: k-core, Amazon 2018/2014, MovieLens, downloads, resume.

Fixtures are written in the exact raw formats (gzipped JSON / Python-literal lines, GroupLens layouts),
with malformed lines, missing metadata, duplicate ASINs, empty titles and missing timestamps mixed in.
Expected outputs are computed here from the fixture's ground truth with naive loops.
"""
import gzip
import http.server
import itertools
import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataset_conversion import amazon, movielens
from dataset_conversion.common import (
    BadInputReport,
    atomic_path,
    kcore_filter,
    kcore_filter_reference,
    load_manifest,
    sha256_file,
)
from dataset_conversion.download_images import download


# ----------------------------------------------------------------------------------------------
# k-core
# ----------------------------------------------------------------------------------------------
def brute_force_core_nodes(pairs, user_k, item_k):
    """The (user_k, item_k)-core by definition: the largest node set whose induced interactions give
    every kept user >= user_k and every kept item >= item_k interactions (enumerates all node sets)."""
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    best = (set(), set())
    for n_users in range(len(users), 0, -1):
        for user_set in itertools.combinations(users, n_users):
            for n_items in range(len(items), 0, -1):
                for item_set in itertools.combinations(items, n_items):
                    if n_users + n_items <= len(best[0]) + len(best[1]):
                        continue
                    kept = [(u, i) for u, i in pairs if u in user_set and i in item_set]
                    user_deg, item_deg = Counter(u for u, _ in kept), Counter(i for _, i in kept)
                    if all(user_deg[u] >= user_k for u in user_set) and all(item_deg[i] >= item_k for i in item_set):
                        best = (set(user_set), set(item_set))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_kcore_matches_brute_force_on_tiny_graphs(seed):
    rng = random.Random(seed)
    n_users, n_items = rng.randint(2, 5), rng.randint(2, 5)
    # multigraph: repeated (user, item) interactions count separately
    pairs = [(f"u{rng.randrange(n_users)}", f"i{rng.randrange(n_items)}") for _ in range(rng.randint(4, 18))]
    user_k, item_k = rng.randint(1, 3), rng.randint(1, 3)
    core_users, core_items = brute_force_core_nodes(pairs, user_k, item_k)
    expected = [p for p, (u, i) in enumerate(pairs) if u in core_users and i in core_items]

    frame = pd.DataFrame(pairs, columns=["user_id", "item_id"])
    fast, _ = kcore_filter(frame, user_k, item_k)
    assert list(fast.index) == expected
    assert kcore_filter_reference(pairs, user_k, item_k) == expected


def test_kcore_fast_equals_reference_on_random_data():
    rng = np.random.default_rng(0)
    users = rng.zipf(1.6, 4000) % 300
    items = rng.zipf(1.4, 4000) % 200
    pairs = [(f"u{u}", f"i{i}") for u, i in zip(users, items)]
    frame = pd.DataFrame(pairs, columns=["user_id", "item_id"])
    for user_k, item_k in [(5, 5), (3, 7), (10, 2)]:
        fast, rounds = kcore_filter(frame, user_k, item_k)
        assert list(fast.index) == kcore_filter_reference(pairs, user_k, item_k)
        assert rounds >= 2  # this data needs cascading removals: a one-pass filter would be wrong
        if len(fast):
            assert fast["user_id"].value_counts().min() >= user_k
            assert fast["item_id"].value_counts().min() >= item_k


def naive_kcore(rows, k):
    rows = list(rows)
    while True:
        user_count = Counter(r[0] for r in rows)
        item_count = Counter(r[1] for r in rows)
        kept = [r for r in rows if user_count[r[0]] >= k and item_count[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


# ----------------------------------------------------------------------------------------------
# Amazon fixtures in the raw formats
# ----------------------------------------------------------------------------------------------
N_USERS, N_ITEMS = 40, 14
ITEMS = [f"B00ITEM{i:03d}" for i in range(N_ITEMS)]
NO_META_ITEM = ITEMS[13]           # reviewed, never in the metadata file
EMPTY_TITLE_ITEM = ITEMS[5]
LOW_RES_ONLY_ITEM = ITEMS[6]       # imageURL but no imageURLHighRes
NO_IMAGE_ITEM = ITEMS[7]


def ground_truth_interactions(seed=3):
    """(user, item, rating, unix time, position) of the valid reviews, in file order."""
    rng = random.Random(seed)
    rows = []
    for u in range(N_USERS):
        user = f"A{u:04d}USER"
        n = rng.choice([2, 4, 6, 8, 10])
        for _ in range(n):
            item = ITEMS[min(int(rng.expovariate(0.25)), N_ITEMS - 1)]
            day = rng.randrange(14000, 17000)  # unixReviewTime is day resolution
            rows.append([user, item, float(rng.randint(1, 5)), day * 86400])
    rng.shuffle(rows)
    return rows


def write_lines(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")


def write_amazon_2018(tmp_path):
    rows = ground_truth_interactions()
    lines, malformed_lines = [], []
    for n, (user, item, rating, ts) in enumerate(rows):
        record = {"overall": rating, "verified": True, "reviewTime": "", "reviewerID": user, "asin": item,
                  "reviewerName": "x", "reviewText": "ok\tfine", "summary": "s", "unixReviewTime": ts}
        if n % 9 == 4:  # timestamp only as reviewTime (MM DD, YYYY): must be recovered
            del record["unixReviewTime"]
            record["reviewTime"] = pd.Timestamp(ts, unit="s").strftime("%m %d, %Y")
        lines.append(json.dumps(record))
        if n % 17 == 0:
            lines.append('{"overall": 5.0, "reviewerID": "BROKEN", "asin": ')  # truncated line
            malformed_lines.append(len(lines))
    lines.append(json.dumps({"overall": 4.0, "reviewerID": "A0000USER", "asin": ITEMS[0]}))  # no timestamp
    no_time_line = len(lines)
    lines.append(json.dumps({"overall": 4.0, "asin": ITEMS[0], "unixReviewTime": 1}))  # no reviewerID
    write_lines(tmp_path / "Office_Products_5.json.gz", lines)

    metas = []
    for n, item in enumerate(ITEMS[:13]):
        record = {"asin": item, "title": f"Stapler &amp; <b>model</b> {n}", "brand": f"Brand{n % 3}",
                  "price": f"${n + 1}.99", "category": ["Office Products", "Office Supplies", f"Cat{n % 4}"],
                  "description": [f"Description of {n}.", "Second paragraph."],
                  "imageURL": [f"https://images.example/{item}._SS40_.jpg"],
                  "imageURLHighRes": [f"https://images.example/{item}.jpg"]}
        if item == EMPTY_TITLE_ITEM:
            record["title"] = ""
        if item == LOW_RES_ONLY_ITEM:
            record["imageURLHighRes"] = []
        if item == NO_IMAGE_ITEM:
            record["imageURL"], record["imageURLHighRes"] = [], []
        if n == 2:
            record["price"] = ".a-box-inner{background-color:#fff;}"  # scraped CSS, not a price
        metas.append(json.dumps(record))
    metas.insert(3, json.dumps({"asin": ITEMS[1], "title": "DUPLICATE record, must be ignored"}))
    metas.insert(5, "{not json at all")
    write_lines(tmp_path / "meta_Office_Products.json.gz", metas)
    return rows, malformed_lines, no_time_line


def read_inter(path):
    frame = pd.read_csv(path, sep="\t", dtype=str)
    assert list(frame.columns) == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    frame.columns = ["user_id", "item_id", "rating", "timestamp"]
    return frame


def read_item(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3).set_index("item_id:token")


def test_amazon_2018_conversion(tmp_path):
    rows, malformed_lines, no_time_line = write_amazon_2018(tmp_path)
    dataset_dir, stats = amazon.convert(tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz",
                                        "Office", tmp_path / "out")

    # expected: drop the item without metadata, 5-core, per user by time then file order
    valid = [(u, i, r, t, n) for n, (u, i, r, t) in enumerate(rows) if i != NO_META_ITEM]
    core = naive_kcore(valid, 5)
    expected = sorted(core, key=lambda row: (row[0], row[3], row[4]))
    inter = read_inter(dataset_dir / "Office.inter")
    assert len(expected) > 40
    assert list(zip(inter.user_id, inter.item_id)) == [(u, i) for u, i, *_ in expected]
    assert inter.timestamp.astype(float).tolist() == [float(t) for *_, t, _ in expected]
    assert inter.rating.astype(float).tolist() == [r for _, _, r, _, _ in expected]
    assert stats["interactions"] == len(expected)

    kept_items = sorted({i for _, i, *_ in expected})
    item2index = [line.split("\t") for line in (dataset_dir / "Office.item2index").read_text().splitlines()]
    assert item2index == [[item, str(row)] for row, item in enumerate(kept_items)]

    items = read_item(dataset_dir / "Office.item")
    assert list(items.index) == kept_items
    n = ITEMS.index(ITEMS[1])
    assert items.loc[ITEMS[1], "title:token_seq"] == f"Stapler & model {n}"  # HTML unescaped+stripped, first record
    assert items.loc[ITEMS[1], "text:token_seq"] == (
        f"Title: Stapler & model {n}; Price: $2.99; Brand: Brand1; "
        "Categories: Office Products, Office Supplies, Cat1")
    assert items.loc[ITEMS[1], "image_url:token"] == f"https://images.example/{ITEMS[1]}.jpg"
    if ITEMS[2] in kept_items:
        assert "Price" not in items.loc[ITEMS[2], "text:token_seq"]  # CSS junk is not a price
    if EMPTY_TITLE_ITEM in kept_items:
        assert items.loc[EMPTY_TITLE_ITEM, "text:token_seq"].startswith("Price: ")
    if LOW_RES_ONLY_ITEM in kept_items:
        assert items.loc[LOW_RES_ONLY_ITEM, "image_url:token"] == f"https://images.example/{LOW_RES_ONLY_ITEM}._SS40_.jpg"
    if NO_IMAGE_ITEM in kept_items:
        assert items.loc[NO_IMAGE_ITEM, "image_url:token"] == ""

    bad = load_manifest(dataset_dir, "Office")["conversion"]["bad_input"]
    assert bad["reviews: malformed line (skipped)"]["count"] == len(malformed_lines)
    assert bad["reviews: malformed line (skipped)"]["first"] == [f"Office_Products_5.json.gz:{n}" for n in malformed_lines[:5]]
    assert bad["reviews: no usable unixReviewTime/reviewTime (skipped)"]["first"] == [f"Office_Products_5.json.gz:{no_time_line}"]
    assert bad["reviews: no reviewerID/asin (skipped)"]["count"] == 1
    assert bad["meta: repeated asin row, differing (first row kept)"]["count"] == 1
    assert (stats["meta_repeated_rows"], stats["meta_repeated_rows_differing"]) == (1, 1)
    assert bad["meta: malformed line (skipped)"]["first"] == ["meta_Office_Products.json.gz:6"]
    assert bad["items without metadata (dropped)"] == {"count": 1, "first": [NO_META_ITEM]}


def test_recbole_reads_the_written_atomic_files(tmp_path):
    """RecBole's own loader (read_csv on the atomic files) sees exactly what the converter wrote."""
    from recbole_mm.config import Config
    from recbole.data import create_dataset

    write_amazon_2018(tmp_path)
    dataset_dir, _ = amazon.convert(tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz",
                                    "Office", tmp_path / "out")
    config = Config(model="SASRec", dataset="Office", config_dict={
        "data_path": str(tmp_path / "out"), "modalities": [], "feature_tables": {},
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "text"]},
        "show_progress": False, "checkpoint_dir": str(tmp_path / "saved")})
    dataset = create_dataset(config)
    inter = read_inter(dataset_dir / "Office.inter")
    assert dataset.inter_num == len(inter)
    assert dataset.user_num - 1 == inter.user_id.nunique()
    items = read_item(dataset_dir / "Office.item")
    token = items.index[0]
    internal = dataset.token2id("item_id", token)
    words = [dataset.field2id_token["text"][w] for w in dataset.item_feat["text"][internal].tolist() if w]
    assert " ".join(words) == items.loc[token, "text:token_seq"]


def test_amazon_2014_python_literal_meta_and_dedup(tmp_path):
    rows = ground_truth_interactions(seed=3)
    rows += [list(rows[0]), list(rows[1])]  # repeated interactions of the same (user, item)
    rows[-1][3] += 86400
    write_lines(tmp_path / "reviews_Office_Products_5.json.gz", [
        json.dumps({"reviewerID": u, "asin": i, "reviewerName": "n", "helpful": [0, 0], "reviewText": "t",
                    "overall": r, "summary": "s", "unixReviewTime": t, "reviewTime": "01 01, 2010"})
        for u, i, r, t in rows])
    metas = []
    for n, item in enumerate(ITEMS):
        record = {"asin": item, "title": f"Pen's model {n}", "price": 3.5 + n, "imUrl": f"http://ecx.example/{item}.jpg",
                  "related": {"also_bought": ["X"]}, "salesRank": {"Office Products": 5},
                  "categories": [["Office Products", "Pens"], ["Office Products", "Writing"]], "brand": "Bic",
                  "description": 'A "fine" pen.\nTwo lines.'}
        metas.append(repr(record))  # Python literal, single quotes: not JSON
    write_lines(tmp_path / "meta_Office_Products.json.gz", metas)

    dataset_dir, stats = amazon.convert(tmp_path / "reviews_Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz",
                                        "Office14", tmp_path / "out", dedup=True, template=amazon.TEXT_PRESETS["mmm4rec"])
    indexed = [(u, i, r, t, n) for n, (u, i, r, t) in enumerate(rows)]
    first_per_pair = {}
    for row in sorted(indexed, key=lambda row: (row[0], row[3], row[4])):
        first_per_pair.setdefault((row[0], row[1]), row)
    expected = sorted(naive_kcore(first_per_pair.values(), 5), key=lambda row: (row[0], row[3], row[4]))
    inter = read_inter(dataset_dir / "Office14.inter")
    assert list(zip(inter.user_id, inter.item_id, inter.timestamp.astype(float))) == [(u, i, float(t)) for u, i, _, t, _ in expected]
    variant_repeats = len(indexed) - len({(u, i, t) for u, i, _, t, _ in indexed})
    assert stats["variant_repeats_removed"] == variant_repeats >= 1  # rows[-2] repeats rows[0] exactly
    assert stats["duplicates_removed"] == len(indexed) - variant_repeats - len(first_per_pair) >= 1
    assert len(expected) > 40

    items = read_item(dataset_dir / "Office14.item")
    item = items.index[0]
    n = ITEMS.index(item)
    # '"' is written as "''" so pandas/RecBole never sees a quoted field
    assert items.loc[item, "text:token_seq"] == f"Title: Pen's model {n} ; Brand: Bic ; Description: A ''fine'' pen. Two lines."
    assert items.loc[item, "categories:token_seq"] == "Office Products, Pens, Writing"
    assert items.loc[item, "price:token_seq"] == f"${3.5 + n:.2f}"
    assert items.loc[item, "image_url:token"] == f"http://ecx.example/{item}.jpg"


def test_amazon_rerun_is_a_noop_until_inputs_or_outputs_change(tmp_path):
    write_amazon_2018(tmp_path)
    args = (tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz", "Office", tmp_path / "out")
    dataset_dir, stats = amazon.convert(*args)
    inter_path = dataset_dir / "Office.inter"
    digest, mtime = sha256_file(inter_path), inter_path.stat().st_mtime_ns
    assert amazon.convert(*args)[1] is None            # nothing redone
    assert inter_path.stat().st_mtime_ns == mtime
    inter_path.write_text(inter_path.read_text()[:100])  # damaged output -> redone
    assert amazon.convert(*args)[1] == stats
    assert sha256_file(inter_path) == digest
    assert amazon.convert(*args, user_k=3, item_k=3)[1]["interactions"] > stats["interactions"]  # new parameters


def test_amazon_nothing_left_is_a_clear_error(tmp_path):
    write_lines(tmp_path / "r.json.gz", ["garbage", json.dumps({"reviewerID": "A", "asin": "B", "overall": 1,
                                                                "unixReviewTime": 5})])
    write_lines(tmp_path / "m.json.gz", [json.dumps({"asin": "B", "title": "t"})])
    with pytest.raises(ValueError, match=r"r\.json\.gz.*5/5-core.*--user_k"):
        amazon.convert(tmp_path / "r.json.gz", tmp_path / "m.json.gz", "X", tmp_path / "out")


def test_text_template_drops_empty_parts_and_rejects_unknown_fields():
    template = amazon.TextTemplate(*amazon.TEXT_PRESETS["fmrlrec"])
    assert template.render({"title": "T", "brand": "", "price": "$1.00", "categories": ""}) == "Title: T; Price: $1.00"
    assert template.render({}) == ""
    with pytest.raises(ValueError, match="colour"):
        amazon.TextTemplate(["{colour}"], "; ")


def test_atomic_path_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_report_summary():
    report = BadInputReport(keep_examples=2)
    for line in (3, 8, 9):
        report.add("malformed", f"f:{line}")
    assert report.as_dict() == {"malformed": {"count": 3, "first": ["f:3", "f:8"]}}
    assert "malformed: 3 (first: f:3, f:8)" in report.summary()


# ----------------------------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------------------------
def test_ml_100k_from_the_recbole_wheel(tmp_path):
    dataset_dir, dataset, stats = movielens.convert("ml-100k", output_dir=tmp_path)
    assert dataset == "ml-100k-mm" and dataset_dir == tmp_path / "ml-100k-mm"
    raw_dir = movielens.bundled_ml_100k()
    raw = pd.read_csv(raw_dir / "ml-100k.inter", sep="\t", dtype=str)
    raw.columns = ["user_id", "item_id", "rating", "timestamp"]
    inter = read_inter(dataset_dir / "ml-100k-mm.inter")
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    # same multiset of (user, item, rating, timestamp) rows, now grouped by user in time order
    assert Counter(map(tuple, inter.values.tolist())) == Counter(map(tuple, raw.values.tolist()))
    for _, group in itertools.islice(inter.groupby("user_id", sort=False), 50):
        assert group.timestamp.astype(int).is_monotonic_increasing
    assert inter.user_id.ne(inter.user_id.shift()).sum() == 943  # each user's rows are contiguous

    items = read_item(dataset_dir / "ml-100k-mm.item")
    raw_items = pd.read_csv(raw_dir / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False).set_index("item_id:token")
    for token in ["1", "2", "267", "1373", "1682"]:
        title, year, genres = raw_items.loc[token, ["movie_title:token_seq", "release_year:token", "class:token_seq"]]
        assert items.loc[token, "title:token_seq"] == (f"{title} ({year})" if year.isdigit() else title)
        assert items.loc[token, "genre:token_seq"] == ", ".join(genres.split())
    assert items.loc["1", "title:token_seq"] == "Toy Story (1995)"
    assert items.loc["1", "genre:token_seq"] == "Animation, Children's, Comedy"


def test_ml_100k_name_is_refused():
    with pytest.raises(ValueError, match="special-cased"):
        movielens.convert("ml-100k", dataset="ml-100k")


def test_ml_1m_grouplens_layout_with_bad_lines(tmp_path):
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    (raw / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                     "2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
                                     "3::broken line\n".encode("latin-1"))
    (raw / "ratings.dat").write_text("1::2::5::978300760\n1::1::3::978300000\n2::1::4::978301968\n"
                                     "2::3::4::978301969\nnonsense\n2::9::4::978301970\n")
    dataset_dir, dataset, stats = movielens.convert("ml-1m", raw_dir=raw, output_dir=tmp_path / "out")
    inter = read_inter(dataset_dir / "ml-1m-mm.inter")
    assert inter.values.tolist() == [["1", "1", "3", "978300000"], ["1", "2", "5", "978300760"], ["2", "1", "4", "978301968"]]
    items = read_item(dataset_dir / "ml-1m-mm.item")
    assert items.loc["2", "title:token_seq"] == "Cité des enfants perdus, La (1995)"
    assert items.loc["2", "genre:token_seq"] == "Adventure, Sci-Fi"
    bad = load_manifest(dataset_dir, dataset)["conversion"]["bad_input"]
    assert bad["movies.dat: malformed line (skipped)"]["first"] == ["movies.dat:3"]
    assert bad["ratings.dat: malformed line (skipped)"]["first"] == ["ratings.dat:5"]
    assert bad["rated movies missing from the movie list (dropped)"]["first"] == ["3", "9"]


def test_ml_100k_grouplens_layout(tmp_path):
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    flags = ["0"] * 19
    action_comedy = list(flags)
    action_comedy[1] = action_comedy[5] = "1"
    (raw / "u.item").write_bytes(("1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(action_comedy) + "\n").encode("latin-1"))
    (raw / "u.data").write_text("7\t1\t4\t881250949\n")
    dataset_dir, _, _ = movielens.convert("ml-100k", raw_dir=raw, output_dir=tmp_path / "out", dataset="tiny-ml")
    items = read_item(dataset_dir / "tiny-ml.item")
    assert items.loc["1"].tolist() == ["Toy Story (1995)", "Action, Comedy"]


# ----------------------------------------------------------------------------------------------
# Image download (local HTTP server: no internet needed)
# ----------------------------------------------------------------------------------------------
class FlakyImageServer(http.server.BaseHTTPRequestHandler):
    hits = Counter()

    def do_GET(self):
        FlakyImageServer.hits[self.path] += 1
        if self.path.startswith("/ok/") or (self.path == "/flaky.png" and self.hits[self.path] > 2):
            body = b"\x89PNG fake image bytes " + self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/gone.jpg":
            self.send_error(404)
        else:
            self.send_error(503)

    def log_message(self, *args):
        pass


def test_download_resumes_and_bounds_retries(tmp_path):
    FlakyImageServer.hits.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyImageServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pairs = [("A", f"{base}/ok/a.jpg"), ("B", f"{base}/gone.jpg"), ("C", f"{base}/flaky.png"),
             ("D", f"{base}/down.jpg"), ("E", ""), ("F", f"{base}/ok/f.webp?x=1")]
    try:
        counts = download(pairs, tmp_path / "img", retries=3, backoff=0.001, workers=2, show_progress=False)
        assert counts == {"downloaded": 3, "already_present": 0, "failed": 2, "no_url": 1}
        assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["A.jpg", "C.png", "F.webp", "failed.tsv"]
        assert FlakyImageServer.hits["/gone.jpg"] == 1    # 404 is permanent: no retry
        assert FlakyImageServer.hits["/down.jpg"] == 4    # 503: 1 try + 3 retries
        assert FlakyImageServer.hits["/flaky.png"] == 3   # succeeded on the third attempt
        failed = (tmp_path / "img" / "failed.tsv").read_text().splitlines()
        assert failed[1:] == [f"B\t{base}/gone.jpg\tHTTP 404", f"D\t{base}/down.jpg\tHTTP 503"]

        hits_before = sum(FlakyImageServer.hits.values())
        again = download(pairs, tmp_path / "img", retries=0, backoff=0.001, show_progress=False)
        assert again == {"downloaded": 0, "already_present": 3, "failed": 2, "no_url": 1}
        assert sum(FlakyImageServer.hits.values()) == hits_before + 2  # only the failed ones were retried
    finally:
        server.shutdown()


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class ImageServer(http.server.BaseHTTPRequestHandler):
    body = bytes(range(256)) * 1200  # 300 KiB: several of the downloader's 64 KiB blocks
    stall_after = None               # send this many bytes, then hang (the client is killed meanwhile)
    stalled = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.stall_after is None:
            self.wfile.write(self.body)
            return
        self.wfile.write(self.body[:self.stall_after])
        self.wfile.flush()
        ImageServer.stalled.set()
        time.sleep(60)

    def log_message(self, *args):
        pass


def test_download_is_durable_before_its_final_name_appears(tmp_path, monkeypatch):
    """fsync of the complete temporary file, then the rename onto the final name, then fsync of the
    folder (the order that survives a power cut: recbole_mm/utils/atomic.py)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        events.append(("fsync", path, path.stat().st_size if path.is_file() else None))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ImageServer.stall_after = None
    server, base = serve(ImageServer)
    image_dir = (tmp_path / "img").resolve()
    try:
        counts = download([("A", f"{base}/a.jpg"), ("B", f"{base}/b.png")], image_dir, retries=0, workers=1,
                          show_progress=False)
    finally:
        server.shutdown()
    assert counts["downloaded"] == 2
    for name in ("A.jpg", "B.png"):
        assert (image_dir / name).read_bytes() == ImageServer.body
        renames = [n for n, event in enumerate(events) if event[0] == "rename" and event[2] == image_dir / name]
        assert len(renames) == 1, events
        at = renames[0]
        temporary = events[at][1]
        assert temporary.parent == image_dir and temporary.name.startswith(".")
        synced = [event for event in events[:at] if event[0] == "fsync" and event[1] == temporary]
        assert synced and synced[-1][2] == len(ImageServer.body), "the complete file is fsynced before the rename"
        assert ("fsync", image_dir, None) in events[at + 1:], "the folder entry is fsynced after the rename"


def test_download_killed_mid_write_leaves_no_partial_image(tmp_path):
    """SIGKILL while an image is half written: nothing under its final name (a rerun would otherwise
    take the half for a finished download), and the rerun fetches it whole."""
    import subprocess
    import sys

    ImageServer.stall_after, ImageServer.stalled = 3 * 65536 + 100, threading.Event()
    server, base = serve(ImageServer)
    image_dir = tmp_path / "img"
    script = ("import sys; from dataset_conversion.download_images import download; "
              "download([('A', sys.argv[1])], sys.argv[2], retries=0, timeout=120, show_progress=False)")
    child = subprocess.Popen([sys.executable, "-c", script, f"{base}/a.jpg", str(image_dir)],
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        assert ImageServer.stalled.wait(120)
        deadline = time.time() + 60
        while time.time() < deadline:  # the client has written the blocks it received
            written = [p for p in image_dir.iterdir() if p.stat().st_size >= 3 * 65536] if image_dir.exists() else []
            if written:
                break
            time.sleep(0.05)
        assert written, "the download never reached its temporary file"
        child.kill()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        server.shutdown()
    assert not (image_dir / "A.jpg").exists()
    ImageServer.stall_after = None
    server, base = serve(ImageServer)
    try:
        counts = download([("A", f"{base}/a.jpg")], image_dir, retries=0, show_progress=False)
    finally:
        server.shutdown()
    assert counts["downloaded"] == 1 and (image_dir / "A.jpg").read_bytes() == ImageServer.body


# ----------------------------------------------------------------------------------------------
# The shipped Office.yaml reads exactly what the converter + encoders write
# ----------------------------------------------------------------------------------------------
class HashingTextEncoder:
    """Deterministic stand-in for a text model (the real ones need the encode extra)."""

    label, backend, precision = "test-hash", "test", "float32"

    def encode(self, texts, batch_size, show_progress):
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)


class MeanColourImageEncoder:
    label, backend, precision = "test-mean-colour", "test", "float32"

    def encode(self, images):
        return np.array([np.asarray(image, dtype=np.float32).mean((0, 1)) + 1 for image in images])


def test_office_products_yaml_matches_the_converter_outputs(tmp_path, in_tmp_cwd):
    from PIL import Image

    from dataset_conversion.encode_features import encode_image_modality, encode_text_modality
    from recbole_mm.quick_start import build

    write_amazon_2018(tmp_path)
    dataset_dir, _ = amazon.convert(tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz",
                                    "Office_Products", tmp_path / "data")
    encode_text_modality(dataset_dir, "Office_Products", "text", "text", HashingTextEncoder(), show_progress=False)
    (tmp_path / "images").mkdir()
    tokens = (dataset_dir / "Office_Products.item2index").read_text().split()[::2]
    for n, token in enumerate(tokens[::2]):  # every other item has an image
        Image.new("RGB", (8, 8), (n * 20, 0, 0)).save(tmp_path / "images" / f"{token}.jpg")
    _, image_present = encode_image_modality(dataset_dir, "Office_Products", tmp_path / "images", MeanColourImageEncoder(),
                                             show_progress=False)

    config, (train_data, _, _), model, _ = build("MMSASRec", "Office_Products", config_dict={
        "data_path": str(tmp_path / "data"), "show_progress": False, "hidden_size": 8, "inner_size": 16})
    assert config["modalities"] == ["text", "image"] and config["TIME_FIELD"] == "timestamp"
    item_tokens = train_data.dataset.field2id_token["item_id"]
    mask = model.feature_mask("image").cpu().numpy()
    assert [bool(mask[i]) for i in range(1, len(item_tokens))] == [
        bool(image_present[tokens.index(t)]) for t in item_tokens[1:]]
    assert 0 < mask[1:].sum() < len(item_tokens) - 1


def test_scripts_run_from_the_command_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "dataset_conversion/movielens.py", "ml-100k", "--no_encode",
                           "--max_users", "3", "--output_dir", str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ml-100k-mm-3users: 3 users" in done.stderr
    assert (tmp_path / "ml-100k-mm-3users" / "ml-100k-mm-3users.inter").exists()
    assert not (tmp_path / "ml-100k-mm").exists()
    for script in ("amazon", "encode_features", "download_images"):
        done = subprocess.run([sys.executable, "-m", f"dataset_conversion.{script}", "--help"], cwd=root,
                              capture_output=True, text=True)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr


# ----------------------------------------------------------------------------------------------
# UniSRec benchmark format (the real Scientific folder)
# ----------------------------------------------------------------------------------------------
def test_unisrec_import_adds_texts_and_keeps_the_hook_mapping(scientific_dir, tmp_path):
    from dataset_conversion import unisrec
    from dataset_conversion.encode_features import encode_text_modality
    from recbole_mm.data.features import FeatureTableSpec, load_feature_table

    dataset_dir, stats = unisrec.convert(scientific_dir, tmp_path)
    assert stats == {"items": 1585, "items_with_text": 1585}
    asin_of_row = {int(row): asin for asin, row in
                   (line.split("\t") for line in (scientific_dir / "Scientific.item2index").read_text().splitlines())}
    text_of_asin = dict(line.split("\t", 1) for line in (scientific_dir / "Scientific.text").read_text().splitlines()[1:])
    items = read_item(dataset_dir / "Scientific.item")
    for row in (0, 1, 777, 1584):
        assert items.loc[str(row), "asin:token"] == asin_of_row[row]
        assert items.loc[str(row), "text:token_seq"] == text_of_asin[asin_of_row[row]].strip()

    tokens = ["[PAD]"] + sorted({line.split("\t")[2] for line in
                                 (scientific_dir / "Scientific.test.inter").read_text().splitlines()[1:]}, key=int)
    for suffix, name in (("feat1CLS", "text"), ("feat3CLS", "image")):
        original = load_feature_table(FeatureTableSpec.from_config(name, {"path": f"Scientific.{suffix}", "dim": 512},
                                                                   scientific_dir),
                                      tokens, scientific_dir / "Scientific.item2index")[0]
        imported = load_feature_table(FeatureTableSpec.from_config(name, {"path": f"Scientific.{suffix}", "dim": 512},
                                                                   dataset_dir),
                                      tokens, dataset_dir / "Scientific.item2index")[0]
        assert (original == imported).all() and original[1:].abs().sum() > 0

    features, present = encode_text_modality(dataset_dir, "Scientific", "minilm", "text", HashingTextEncoder(),
                                             normalize=False, show_progress=False)
    expected_text = text_of_asin[asin_of_row[777]].strip()
    assert features[777].tolist() == [len(expected_text), sum(map(ord, expected_text)) % 97, 1.0] and present.all()
    assert unisrec.convert(scientific_dir, tmp_path)[1] is None  # re-run: nothing to do


def test_ratings_only_csv_2018_and_2014_layouts(tmp_path):
    rows = ground_truth_interactions()
    write_amazon_2018(tmp_path)  # for the metadata file
    (tmp_path / "Office_Products.csv").write_text(
        "".join(f"{i},{u},{r},{t}\n" for u, i, r, t in rows) + "B00ITEM000,AX,not-a-number,5\nonly,three,fields\n")
    (tmp_path / "ratings_Office_Products.csv").write_text("".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    meta = tmp_path / "meta_Office_Products.json.gz"
    dir18, _ = amazon.convert(tmp_path / "Office_Products.csv", meta, "Csv18", tmp_path / "out")
    dir14, _ = amazon.convert(tmp_path / "ratings_Office_Products.csv", meta, "Csv14", tmp_path / "out",
                              csv_columns=amazon.CSV_2014_COLUMNS)
    valid = [(u, i, r, t, n) for n, (u, i, r, t) in enumerate(rows) if i != NO_META_ITEM]
    expected = [(u, i, float(t)) for u, i, _, t, _ in sorted(naive_kcore(valid, 5), key=lambda row: (row[0], row[3], row[4]))]
    for dataset_dir, name in ((dir18, "Csv18"), (dir14, "Csv14")):
        inter = read_inter(dataset_dir / f"{name}.inter")
        assert list(zip(inter.user_id, inter.item_id, inter.timestamp.astype(float))) == expected
    bad = load_manifest(dir18, "Csv18")["conversion"]["bad_input"]
    assert bad["ratings csv: non-numeric or non-finite rating/timestamp (skipped)"]["first"] == [f"Office_Products.csv:{len(rows) + 1}"]
    assert bad["ratings csv: malformed line (skipped)"]["first"] == [f"Office_Products.csv:{len(rows) + 2}"]


def test_reconversion_with_another_item_list_removes_stale_features(tmp_path):
    from dataset_conversion.encode_features import encode_text_modality

    name = "ml-100k-mm-small"
    dataset_dir, _, _ = movielens.convert("ml-100k", output_dir=tmp_path, dataset=name, max_users=3)
    encode_text_modality(dataset_dir, name, "text", "title", HashingTextEncoder(), show_progress=False)
    assert (dataset_dir / f"{name}.text.npy").exists()
    movielens.convert("ml-100k", output_dir=tmp_path, dataset=name, max_users=3, force=True)  # same items: features stay
    assert "text" in load_manifest(dataset_dir, name)["features"]
    movielens.convert("ml-100k", output_dir=tmp_path, dataset=name, max_users=4)  # more items: old rows would be wrong
    assert not (dataset_dir / f"{name}.text.npy").exists()
    assert not (dataset_dir / f"{name}.text.mask.npy").exists()
    assert load_manifest(dataset_dir, name)["features"] == {}


@pytest.mark.parametrize("dataset", ["Office", "ml-100k-mm", "ml-1m-mm"])
def test_default_output_dir_is_where_a_run_looks(dataset, monkeypatch, tmp_path):
    from dataset_conversion.common import default_data_dir
    from recbole_mm.config import Config

    monkeypatch.delenv("RECBOLE_MM_DATA", raising=False)
    config = Config(model="SASRec", dataset=dataset, config_dict={"modalities": []})
    assert Path(config["data_path"]) == default_data_dir() / dataset == Path("dataset") / dataset
    monkeypatch.setenv("RECBOLE_MM_DATA", "/elsewhere")
    config = Config(model="SASRec", dataset=dataset, config_dict={"modalities": []})
    assert Path(config["data_path"]) == default_data_dir() / dataset == Path("/elsewhere") / dataset
    # the user's own data_path (command line, config files, config_dict) beats the variable
    config = Config(model="SASRec", dataset=dataset, config_dict={"modalities": []}, cmd_args=["--data_path=/mine"])
    assert Path(config["data_path"]) == Path("/mine") / dataset
    user_yaml = tmp_path / "user.yaml"
    user_yaml.write_text("data_path: /theirs\n")
    config = Config(model="SASRec", dataset=dataset, config_file_list=[str(user_yaml)], config_dict={"modalities": []})
    assert Path(config["data_path"]) == Path("/theirs") / dataset


def test_keep_items_without_meta_and_empty_text_field_error(tmp_path):
    from dataset_conversion.encode_features import encode_text_modality

    write_amazon_2018(tmp_path)
    dataset_dir, _ = amazon.convert(tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz",
                                    "Keep", tmp_path / "out", user_k=2, item_k=2, keep_items_without_meta=True)
    items = read_item(dataset_dir / "Keep.item")
    assert items.loc[NO_META_ITEM].tolist() == [""] * 7
    bad = load_manifest(dataset_dir, "Keep")["conversion"]["bad_input"]
    assert bad["items without metadata (kept, empty text)"]["first"] == [NO_META_ITEM]
    assert bad["kept items with empty text (text mask False)"]["first"] == [NO_META_ITEM]
    features, present = encode_text_modality(dataset_dir, "Keep", "text", "text", HashingTextEncoder(), show_progress=False)
    row = list(items.index).index(NO_META_ITEM)
    assert not present[row] and not features[row].any() and present.sum() == len(items) - 1
    lines = (dataset_dir / "Keep.item").read_text().splitlines()
    (dataset_dir / "Keep.item").write_text("\n".join([lines[0]] + ["\t".join([l.split("\t")[0]] + [""] * 7) for l in lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"Keep\.item: field 'text' is empty for all"):
        encode_text_modality(dataset_dir, "Keep", "text", "text", HashingTextEncoder(), show_progress=False)
