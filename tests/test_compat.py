"""RecBole's missing-value steps under pandas copy-on-write (the only mode from pandas 3).

RecBole 1.2.1 fills missing values with chained ``feat[field].fillna(..., inplace=True)``, which under
copy-on-write fills a temporary copy; recbole_mm.compat replaces those steps. The expectations below
are RecBole's documented imputation written out by hand: token -> 0 ([PAD]), float -> the mean of
the present values, empty sequence -> an all-padding row.
"""
import contextlib
import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import recbole_mm  # noqa: F401  (applies recbole_mm.compat)
from recbole.config import Config
from recbole.data.dataset import Dataset, SequentialDataset

PANDAS_3 = int(pd.__version__.split(".")[0]) >= 3


@contextlib.contextmanager
def pandas_mode(mode):
    """pandas 2.x switched to pandas 3's behaviour: copy-on-write, optionally the pyarrow-less str dtype."""
    if mode == "default":
        yield
        return
    options = ["mode.copy_on_write", True]
    if mode == "pandas3":
        options += ["future.infer_string", True]
    with pd.option_context(*options):
        yield


MODES = ["default"] if PANDAS_3 else ["default", "copy_on_write"]
if not PANDAS_3 and importlib.util.find_spec("pyarrow"):  # pandas 2's str dtype preview needs pyarrow
    MODES.append("pandas3")


def write_dataset(root, name="NanToy"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t4.0\t1\n"
        "u1\ti2\t\t2\n"
        "u2\ti3\t2.0\t3\n"
        "u2\ti1\t3.0\t4\n"
    )
    (folder / f"{name}.item").write_text(
        "item_id:token\tprice:float\tbrand:token\tcategories:token_seq\tscores:float_seq\n"
        "i1\t10.0\tacme\tc1 c2\t0.5 1.5\n"
        "i2\t\t\t\t\n"
        "i3\t30.0\tzeta\tc2\t2.5\n"
    )
    return name


def build_dataset(root, **overrides):
    name = write_dataset(root)
    config_dict = {
        "data_path": str(root),
        "load_col": {
            "inter": ["user_id", "item_id", "rating", "timestamp"],
            "item": ["item_id", "price", "brand", "categories", "scores"],
        },
        "normalize_all": False,
        "normalize_field": None,
        "show_progress": False,
    }
    config_dict.update(overrides)
    return Dataset(Config(model="Pop", dataset=name, config_dict=config_dict))


def item_rows(dataset, field):
    """{item token or "[PAD]": value} of an item feature column."""
    tokens = dataset.field2id_token["item_id"]
    return {tokens[row]: value for row, value in dataset.item_feat.set_index("item_id")[field].items()}


@pytest.mark.parametrize("mode", MODES)
def test_missing_values_filled_as_recbole_documents(tmp_path, mode):
    with pandas_mode(mode):
        dataset = build_dataset(tmp_path)
    item = {token: dataset.token2id("item_id", token) for token in ("i1", "i2", "i3")}
    pad = 0
    items = dataset.item_feat.set_index("item_id")  # rows: [PAD] (added by RecBole's merge), i1, i2, i3
    assert sorted(items.index) == [pad, *sorted(item.values())]

    # float: the mean of the present prices, (10 + 30) / 2, also for the [PAD] row
    assert items["price"].to_dict() == {pad: 20.0, item["i1"]: 10.0, item["i2"]: 20.0, item["i3"]: 30.0}

    # token: 0 ([PAD]) for the empty cell and the [PAD] row, the real ids elsewhere
    brand = items["brand"].to_dict()
    assert brand[pad] == 0 and brand[item["i2"]] == 0
    assert dataset.id2token("brand", int(brand[item["i1"]])) == "acme"
    assert dataset.id2token("brand", int(brand[item["i3"]])) == "zeta"

    # token_seq / float_seq: an empty cell (and the [PAD] row) is an empty sequence
    categories = {row: list(dataset.id2token("categories", list(ids))) for row, ids in items["categories"].items()}
    assert categories == {pad: [], item["i1"]: ["c1", "c2"], item["i2"]: [], item["i3"]: ["c2"]}
    scores = {row: list(values) for row, values in items["scores"].items()}
    assert scores == {pad: [], item["i1"]: [0.5, 1.5], item["i2"]: [], item["i3"]: [2.5]}

    # float field of the interactions: the missing rating is the mean of 4, 2, 3
    inter = dataset.inter_feat
    assert dict(zip(inter["timestamp"], inter["rating"])) == {1.0: 4.0, 2.0: 3.0, 3.0: 2.0, 4.0: 3.0}

    # and the tensors the models get hold no NaN and no garbage ids
    dataset._change_feat_format()
    assert dataset.item_feat["brand"].dtype == torch.int64
    assert set(dataset.item_feat["brand"].tolist()) == {0, int(brand[item["i1"]]), int(brand[item["i3"]])}
    assert not torch.isnan(dataset.item_feat["price"]).any()


def test_chained_fillna_is_a_no_op_under_copy_on_write():
    """Why compat replaces RecBole's fillna steps: the chained call leaves the frame unfilled."""
    with pandas_mode("default" if PANDAS_3 else "copy_on_write"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns about the chained call (ChainedAssignmentError)
        frame = pd.DataFrame({"price": [1.0, np.nan]})
        frame["price"].fillna(value=0.0, inplace=True)
    assert np.isnan(frame["price"].iloc[1])


# Sequence columns: RecBole takes per-row lengths as column.agg(len), one number from pandas 3 on.

@pytest.mark.parametrize("mode", MODES)
def test_float_sequences_normalized_row_by_row(tmp_path, mode):
    with pandas_mode(mode):
        dataset = build_dataset(tmp_path, normalize_field=["scores"])
    # min-max over all values (0.5, 1.5, 2.5): x -> (x - 0.5) / 2
    scores = {token: list(values) for token, values in item_rows(dataset, "scores").items()}
    assert scores == {"[PAD]": [], "i1": [0.0, 0.5], "i2": [], "i3": [1.0]}


@pytest.mark.parametrize("mode", MODES)
def test_float_sequences_discretized_row_by_row(tmp_path, mode):
    with pandas_mode(mode):
        dataset = build_dataset(tmp_path, numerical_features=["scores"],
                                discretization={"scores": {"method": "ED", "bucket": 2}})
    # equal-distance buckets over [0.5, 2.5]: floor((x - 0.5) * 2 / 2 + 1) -> 0.5: 1, 1.5: 1, 2.5: 2
    buckets = {token: list(pair[1]) for token, pair in item_rows(dataset, "scores").items()}
    assert buckets == {"[PAD]": [], "i1": [1, 1], "i2": [], "i3": [2]}
    assert dataset.field2bucketnum["scores"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_benchmark_histories_keep_their_own_lengths(tmp_path, mode):
    histories = {"train": [("u1", "i1", "i2"), ("u2", "i3", "i1 i2 i4")], "valid": [("u1", "i3", "i1 i2")],
                 "test": [("u1", "i4", "i1 i2 i3"), ("u2", "i2", "i1")]}
    folder = tmp_path / "SeqToy"
    folder.mkdir()
    for split, rows in histories.items():
        lines = ["user_id:token\titem_id:token\titem_id_list:token_seq"] + ["\t".join(row) for row in rows]
        (folder / f"SeqToy.{split}.inter").write_text("\n".join(lines) + "\n")
    config = Config(model="SASRec", dataset="SeqToy", config_dict={
        "data_path": str(tmp_path), "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"], "load_col": {"inter": ["user_id", "item_id", "item_id_list"]},
        "TIME_FIELD": None, "train_neg_sample_args": None, "show_progress": False})
    with pandas_mode(mode):
        dataset = SequentialDataset(config)
    assert dataset.inter_feat["item_length"].tolist() == [1, 3, 2, 3, 1]
    tokens = dataset.field2id_token["item_id"]
    assert [list(tokens[ids]) for ids in dataset.inter_feat["item_id_list"]] == [
        ["i2"], ["i1", "i2", "i4"], ["i1", "i2"], ["i1", "i2", "i3"], ["i1"]]


def test_recbole_anomaly_mode_is_switched_off_after_its_models_load():
    """RecBole's sine.py turns autograd anomaly detection on at import (a NaN check on every backward
    node); recbole-mm switches it off. Each check in a fresh interpreter, so import order is real."""
    def anomaly_enabled(code):
        out = subprocess.run([sys.executable, "-c", code + "; import torch; print(torch.is_anomaly_enabled())"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    plain = ("import numpy as np; np.float_ = getattr(np, 'float_', np.float64); "
             "np.complex_ = getattr(np, 'complex_', np.complex128); np.unicode_ = getattr(np, 'unicode_', np.str_); "
             "import recbole.model.sequential_recommender")
    assert anomaly_enabled(plain) == "True"  # what RecBole does alone (if this fails, drop the workaround)
    assert anomaly_enabled("import recbole_mm; from recbole_mm.utils import get_model; get_model('SINE')") == "False"
