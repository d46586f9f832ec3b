"""LLaRA's and LLMRank's LastFM: converters on the real raw files (counts recomputed here from the raw
lines/rows), the restricted unpickler against malicious pickles, bad input of both formats, the
candidate files through the protocol, and the row-counter timestamps."""
import json
import logging
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from dataset_conversion import llara, llmrank
from dataset_conversion.common import load_manifest
from recbole_mm.data.dataset import counter_like_timestamps
from tests.conftest import shared_dataset_dir


@pytest.fixture(scope="module")
def llara_raw():
    return shared_dataset_dir("raw/llara-lastfm")


@pytest.fixture(scope="module")
def llmrank_raw():
    return shared_dataset_dir("raw/lastfm-llmrank")


@pytest.fixture(scope="module")
def llara_converted(llara_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("llara")
    dataset_dir, stats = llara.convert(llara_raw, root)
    return root, dataset_dir, stats


@pytest.fixture(scope="module")
def llmrank_converted(llmrank_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("llmrank")
    dataset_dir, stats = llmrank.convert(llmrank_raw, root)
    return root, dataset_dir, stats


def read_rows(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


# --------------------------------------------------------------------------------------------------
# LLaRA
# --------------------------------------------------------------------------------------------------
def test_llara_rows_equal_a_plain_loop_over_the_pickles(llara_raw, llara_converted):
    _, dataset_dir, stats = llara_converted
    raw_counts = {"train": 50800, "valid": 3133, "test": 2861}  # SOURCE.md
    for split, file_name in llara.SPLIT_FILES:
        frame = llara.read_dataframe_pickle(llara_raw / file_name)
        assert len(frame) == raw_counts[split]
        expected, inconsistent = [], []
        for index, row in frame.iterrows():
            real = [item for item in row["seq"] if item != 4606]
            if len(real) != row["len_seq"]:
                inconsistent.append(index)
            elif len(real) >= 3:
                expected.append([f"{split}_{index}", " ".join(map(str, real)), str(row["next"])])
        header, rows = read_rows(dataset_dir / f"lastfm-llara.{split}.inter")
        assert header == ["user_id:token", "item_id_list:token_seq", "item_id:token"]
        assert rows == expected
        bad = load_manifest(dataset_dir, "lastfm-llara")["conversion"]["bad_input"][
            f"{file_name}: len_seq differs from the number of real items in seq (row dropped)"]
        assert bad["count"] == len(inconsistent) and bad["first"][0] == f"{file_name}:row {inconsistent[0]}"
    assert (stats["train"]["rows"], stats["valid"]["rows"], stats["test"]["rows"]) == (47872, 2767, 2495)
    names = [line.split("::", 1)[1].strip() for line in (llara_raw / "id2name.txt").read_text(encoding="utf-8").splitlines()]
    _, items = read_rows(dataset_dir / "lastfm-llara.item")
    assert len(items) == 4606 and items[2] == ["2", names[2]] == ["2", "Café Del Mar"]


def test_llara_rerun_is_a_no_op(llara_raw, llara_converted):
    root, _, _ = llara_converted
    assert llara.convert(llara_raw, root)[1] is None


class RunsCode:
    """A pickle payload: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_llara_unpickler_refuses_anything_but_a_dataframe(tmp_path):
    marker = tmp_path / "code-ran"
    plain = tmp_path / "plain.df"
    plain.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(llara.UnsafePickleError, match=r"plain.df: the pickle asks for posix.system"):
        llara.read_dataframe_pickle(plain)
    hidden = tmp_path / "hidden.df"  # a real DataFrame whose cell holds the payload
    hidden.write_bytes(pickle.dumps(pd.DataFrame({"seq": [[1, 2], RunsCode(marker)], "len_seq": [2, 2], "next": [3, 4]})))
    with pytest.raises(llara.UnsafePickleError, match="posix.system"):
        llara.read_dataframe_pickle(hidden)
    assert not marker.exists()
    series = tmp_path / "series.df"
    series.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="holds a list, expected a pandas DataFrame"):
        llara.read_dataframe_pickle(series)


def write_llara_raw(root, frames, n_items=12):
    root.mkdir()
    (root / "id2name.txt").write_text("".join(f"{i}::artist {i}\n" for i in range(n_items)) + "broken line\n")
    for (_, file_name), frame in zip(llara.SPLIT_FILES, frames):
        (root / file_name).write_bytes(pickle.dumps(frame, protocol=4))


def test_llara_malformed_rows_are_counted_with_file_and_row(tmp_path):
    pad = 12
    good = {"seq": [1, 2, 3, pad], "len_seq": 3, "next": 4}
    train = pd.DataFrame([
        good,
        {"seq": [1, 2, 3], "len_seq": 3, "next": 4},             # 1: wrong window
        {"seq": [1, 99, 3, pad], "len_seq": 3, "next": 4},       # 2: unknown id
        {"seq": [1, pad, 3, pad], "len_seq": 2, "next": 4},      # 3: padding before a real item
        {"seq": [1, 2, 3, pad], "len_seq": 4, "next": 4},        # 4: len_seq disagrees
        {"seq": [1, 2, 3, pad], "len_seq": 3, "next": pad},      # 5: padding target
        {"seq": [1, 2, pad, pad], "len_seq": 2, "next": 4},      # 6: short history (min_history 3)
    ])
    frames = [train, pd.DataFrame([good]), pd.DataFrame([good, {"seq": "1 2 3", "len_seq": 3, "next": 4}])]
    write_llara_raw(tmp_path / "raw", frames)
    dataset_dir, stats = llara.convert(tmp_path / "raw", tmp_path / "out", "toy", window=4, padding_id=pad)
    bad = load_manifest(dataset_dir, "toy")["conversion"]["bad_input"]
    expected = {
        "train_data.df: seq is not a list of 4 ids (row dropped)": ["train_data.df:row 1"],
        "train_data.df: seq holds ids outside the item list (row dropped)": ["train_data.df:row 2"],
        "train_data.df: padding before a real item in seq (row dropped)": ["train_data.df:row 3"],
        "train_data.df: len_seq differs from the number of real items in seq (row dropped)": ["train_data.df:row 4"],
        "train_data.df: next is the padding id or outside the item list (row dropped)": ["train_data.df:row 5"],
        "Test_data.df: seq is not a list of 4 ids (row dropped)": ["Test_data.df:row 1"],
        "id2name.txt: malformed line, expected 'id::name' (skipped)": ["id2name.txt:13"],
    }
    assert {kind: entry["first"] for kind, entry in bad.items()} == expected
    assert stats["train"] == {"raw_rows": 7, "rows": 1, "below_min_history_3": 1, "malformed": 5}
    assert read_rows(dataset_dir / "toy.train.inter")[1] == [["train_0", "1 2 3", "4"]]
    _, stats = llara.convert(tmp_path / "raw", tmp_path / "out", "toy", min_history=1, window=4, padding_id=pad)
    assert stats["train"]["rows"] == 2


def test_llara_candidate_protocol_draws_from_the_whole_catalogue(llara_converted):
    """The yaml loads all 4,606 artists, so sampled candidates range over LLaRA's item list."""
    from recbole_mm.config import Config
    from recbole_mm.evaluator.candidate_protocol import candidate_source_from_config
    from recbole_mm.data.utils import create_dataset

    root, _, _ = llara_converted
    config = Config("SASRec", "lastfm-llara", config_dict={"data_path": str(root), "num_candidates": 20,
                                                            "show_progress": False})
    dataset = create_dataset(config)
    assert dataset.item_num == 4606 + 1
    test = dataset.build()[2]
    assert len(test) == 2495
    source = candidate_source_from_config(config, dataset)
    batch = test[np.arange(64)]
    candidates, labels = source.evaluation_candidates(batch["user_id"], batch["item_id_list"], batch["item_id"])
    assert candidates.shape == (64, 20)
    for row in range(64):
        history = set(batch["item_id_list"][row].tolist()) - {0}
        assert candidates[row, labels[row]] == batch["item_id"][row]
        assert len(set(candidates[row].tolist())) == 20 and not history & set(candidates[row].tolist())


# --------------------------------------------------------------------------------------------------
# LLMRank
# --------------------------------------------------------------------------------------------------
def test_llmrank_counts_and_names_from_the_raw_lines(llmrank_raw, llmrank_converted):
    _, dataset_dir, stats = llmrank_converted
    raw = [line.split("\t") for line in (llmrank_raw / "lastfm.inter").read_text().splitlines()[1:]]
    assert stats["interactions"] == len(raw) == 68436
    assert stats["users"] == len({r[0] for r in raw}) == 1142
    assert stats["items"] == len({r[1] for r in raw}) == 11853
    header, rows = read_rows(dataset_dir / "lastfm-llmrank.inter")
    assert header == ["user_id:token", "item_id:token", "timestamp:float"]
    by_user = {}
    for user, item, time in raw:
        by_user.setdefault(user, []).append((int(time), item))
    written = {}
    for user, item, time in rows:
        written.setdefault(user, []).append((int(time), item))
    assert written == {user: sorted(pairs) for user, pairs in by_user.items()}
    names = dict(tuple(row) for row in read_rows(dataset_dir / "lastfm-llmrank.item")[1])
    assert names["4354"] == "Lee ''Scratch'' Perry" and names["3"] == "Café Del Mar"
    assert (dataset_dir / "lastfm-llmrank.random").read_text() == (llmrank_raw / "lastfm.random").read_text()
    assert stats["candidates_per_line"] == {100: 200}
    assert stats["timestamps"].startswith("row counter")
    assert load_manifest(dataset_dir, "lastfm-llmrank")["conversion"]["bad_input"] == {}


def test_llmrank_file_candidates_are_llmranks_sets(llmrank_raw, llmrank_converted):
    """For the 200 users: the first 19 listed items (none is the target here) plus the test item."""
    from recbole_mm.config import Config
    from recbole_mm.evaluator.candidate_protocol import candidate_source_from_config
    from recbole_mm.data.utils import create_dataset

    root, _, _ = llmrank_converted
    config = Config("SASRec", "lastfm-llmrank", config_dict={
        "data_path": str(root), "candidate_file": "lastfm-llmrank.random", "num_candidates": 20, "show_progress": False})
    dataset = create_dataset(config)
    test = dataset.build()[2]
    source = candidate_source_from_config(config, dataset)
    batch = test[np.arange(len(test))]
    covered = source.covers(batch["user_id"], batch["item_id"])
    assert int(covered.sum()) == 200
    users, histories, targets = batch["user_id"][covered], batch["item_id_list"][covered], batch["item_id"][covered]
    candidates, labels = source.evaluation_candidates(users, histories, targets)
    raw = dict(line.split("\t") for line in (llmrank_raw / "lastfm.random").read_text().splitlines())
    last_item = {}
    for line in (llmrank_raw / "lastfm.inter").read_text().splitlines()[1:]:
        user, item, _ = line.split("\t")
        last_item[user] = item  # rows are in time order per user
    item_token = dataset.field2id_token["item_id"]
    for row, user in enumerate(users.tolist()):
        user_token = dataset.field2id_token["user_id"][user]
        got = [item_token[i] for i in candidates[row].tolist()]
        assert got.pop(int(labels[row])) == last_item[user_token]
        assert got == raw[user_token].split()[:19]


def test_counter_timestamps_warned_unless_the_dataset_says_so(llmrank_converted, caplog):
    from recbole_mm.config import Config
    from recbole_mm.data import MultimodalSequentialDataset

    root, _, _ = llmrank_converted
    common = {"data_path": str(root), "modalities": [], "show_progress": False}
    with caplog.at_level(logging.WARNING):
        flagged = MultimodalSequentialDataset(Config("MMSASRec", "lastfm-llmrank", config_dict=common))
    assert not flagged.has_timestamps and "row counter" not in caplog.text
    with caplog.at_level(logging.WARNING):
        unflagged = MultimodalSequentialDataset(Config("MMSASRec", "lastfm-llmrank",
                                                       config_dict={**common, "timestamps_are_order": False}))
    assert unflagged.has_timestamps
    assert "99% of the steps between a user's consecutive timestamps are exactly 1" in caplog.text
    assert "timestamps_are_order: True" in caplog.text


def test_counter_detection_against_real_clocks():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), 20)
    counter = np.concatenate([np.arange(20) + 1000 for _ in range(50)])
    assert counter_like_timestamps(users, counter)[:2] == (True, 1.0)
    clock = np.concatenate([np.sort(rng.integers(0, 10**9, 20)) for _ in range(50)])
    assert not counter_like_timestamps(users, clock)[0]
    days = np.concatenate([np.sort(rng.integers(0, 400, 20)) * 86400 for _ in range(50)])  # Amazon-style days
    assert not counter_like_timestamps(users, days)[0]
    assert not counter_like_timestamps(users, np.zeros(len(users)))[0]


def test_llmrank_bad_input_is_counted_with_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "lastfm.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        "1\t1\t11\n1\t2\t12\n1\t3\t13\n1\t4\t14\n"
        "2\t1\t22\n2\t2\t21\n2\t3\t23\n2\t3\t23\n"  # line 7: backwards in time; line 9: repeated row
        "2\t5\n"                                     # line 10: malformed
        "2\t4\tyesterday\n"                          # line 11: non-numeric timestamp
    )
    (raw / "lastfm.item").write_text('item_id:token\tmovie_title:token_seq\n1\tOne\n2\t"Two ""2"""\n2\tdup\n3\t\n4\tFour\n')
    (raw / "lastfm.random").write_text(
        "1\t5 6\n"       # 5 and 6 are unknown items
        "2\t4 1\n"       # kept; 1 is from the user's history
        "3\t1 2\n"       # unknown user
        "1\t1 2 2\n"     # an item listed twice
        "1\t4 2\n"       # kept; 4 is the user's test item, 2 from its history
        "2\t1 3\n"       # repeated user
        "1\t1 2\n"       # repeated user
    )
    dataset_dir, stats = llmrank.convert(raw, tmp_path / "out", "toy")
    bad = {kind: entry["first"] for kind, entry in load_manifest(dataset_dir, "toy")["conversion"]["bad_input"].items()}
    assert bad == {
        "lastfm.inter: malformed line (skipped)": ["lastfm.inter:10"],
        "lastfm.inter: non-numeric or non-finite timestamp (skipped)": ["lastfm.inter:11"],
        "lastfm.inter: timestamp earlier than the user's previous line (kept, sorted)": ["lastfm.inter:7"],
        "lastfm.inter: repeated (user, item, timestamp) row (first kept)": ["lastfm.inter:9"],
        "lastfm.item: repeated item (first kept)": ["lastfm.item:4"],
        "lastfm.item: interacted item without a name (text mask False)": ["3"],
        "lastfm.random: unknown item (line dropped)": ["lastfm.random:1"],
        "lastfm.random: unknown user (line dropped)": ["lastfm.random:3"],
        "lastfm.random: an item listed twice (line dropped)": ["lastfm.random:4"],
        "lastfm.random: repeated user (line dropped)": ["lastfm.random:6", "lastfm.random:7"],
        "lastfm.random: candidates from the user's history (kept)": ["lastfm.random:2", "lastfm.random:5"],
        "lastfm.random: the user's test item is a candidate (kept; removed at evaluation)": ["lastfm.random:5"],
    }
    assert (dataset_dir / "toy.random").read_text() == "2\t4 1\n1\t4 2\n"
    assert read_rows(dataset_dir / "toy.inter")[1][4:] == [["2", "2", "21"], ["2", "1", "22"], ["2", "3", "23"]]
    names = dict(tuple(row) for row in read_rows(dataset_dir / "toy.item")[1])
    assert names == {"1": "One", "2": "Two ''2''", "3": "", "4": "Four"}
    assert stats["interactions"] == 7
    json.dumps(stats)  # the manifest entry is plain JSON
