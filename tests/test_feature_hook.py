"""The feature hook against the raw files, on a slice of Scientific and a timestamped toy dataset."""
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import data_preparation

from recbole_mm.config import Config
from recbole_mm.data.features import FeatureTableSpec, load_feature_table
from recbole_mm.data import create_dataset
from recbole_mm.utils import RecboleMMError
from tests.conftest import scientific_slice_config, write_scientific_slice, write_timestamped_dataset


def build_dataset(config_dict, dataset, model="MMSASRec"):
    return create_dataset(Config(model, dataset, config_dict=config_dict))


@pytest.fixture
def scientific_slice(scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root)
    return root


def test_rows_match_raw_files(scientific_slice, scientific_dir):
    dataset = build_dataset(scientific_slice_config(scientific_slice), "SciSlice")
    raw_text = np.fromfile(scientific_dir / "Scientific.feat1CLS", dtype=np.float32).reshape(-1, 512)
    raw_image = np.fromfile(scientific_dir / "Scientific.feat3CLS", dtype=np.float32).reshape(-1, 512)
    tokens = dataset.field2id_token["item_id"]
    assert tokens[0] == "[PAD]"
    assert torch.all(dataset.item_features["text"][0] == 0)
    rng = np.random.default_rng(0)
    for internal_id in rng.choice(np.arange(1, len(tokens)), size=25, replace=False):
        row = int(tokens[internal_id])  # UniSRec: the token is the feature row
        assert np.array_equal(dataset.item_features["text"][internal_id].numpy(), raw_text[row])
        assert np.array_equal(dataset.item_features["image"][internal_id].numpy(), raw_image[row])
    assert dataset.item_feature_masks["text"][1:].all() and not dataset.item_feature_masks["text"][0]
    assert not dataset.has_timestamps


def test_item2index_mapping_and_timestamps(in_tmp_cwd):
    root = in_tmp_cwd / "data"
    _, tokens, order, features = write_timestamped_dataset(root)
    config = {
        "data_path": str(root),
        "feature_tables": {"text": {"path": "TimeToy.text.npy"}, "image": {"path": "TimeToy.image.npy"}},
        "modalities": ["text", "image"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "show_progress": False,
    }
    config_obj = Config("MMSASRec", "TimeToy", config_dict=config)
    dataset = create_dataset(config_obj)
    row_of_token = {tokens[item]: row for row, item in enumerate(order)}
    for internal_id, token in enumerate(dataset.field2id_token["item_id"][1:], start=1):
        assert np.array_equal(dataset.item_features["text"][internal_id].numpy(), features[row_of_token[token]])
    assert dataset.has_timestamps
    train_data, _, _ = data_preparation(config_obj, dataset)
    batch = next(iter(train_data))
    items, times = batch["item_id_list"], batch["timestamp_list"]
    assert times.shape == items.shape
    assert torch.all((times == 0) == (items == 0)), "timestamps are padded exactly where items are"
    assert torch.all(times[:, 1:][items[:, 1:] > 0] >= times[:, :-1][items[:, 1:] > 0]), "chronological"


def write_table(path, array):
    np.save(path, array.astype(np.float32))


@pytest.fixture
def toy(in_tmp_cwd):
    root = in_tmp_cwd / "data"
    target, tokens, order, features = write_timestamped_dataset(root)
    return root, target, features


def toy_config(root, **table):
    entry = {"path": "TimeToy.text.npy"}
    entry.update(table)
    return {
        "data_path": str(root),
        "feature_tables": {"text": entry},
        "modalities": ["text"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "show_progress": False,
    }


def expect_error(root, fragment, **table):
    with pytest.raises(RecboleMMError) as error:
        build_dataset(toy_config(root, **table), "TimeToy")
    assert fragment in str(error.value)
    return str(error.value)


def test_missing_file(toy):
    root, _, _ = toy
    message = expect_error(root, "does not exist", path="nope.npy")
    assert "nope.npy" in message and "dataset_conversion" in message


def test_wrong_row_count(toy):
    root, target, features = toy
    write_table(target / "short.npy", features[:-3])
    message = expect_error(root, "misaligned", path="short.npy")
    assert "27 rows" in message and "30 items" in message


def test_wrong_dim(toy):
    root, _, _ = toy
    message = expect_error(root, "dimension 8", path="TimeToy.text.npy", dim=16)
    assert "dim: 16" in message


def test_raw_file_needs_dim_and_whole_rows(toy):
    root, target, features = toy
    features.tofile(target / "TimeToy.featX")
    expect_error(root, "dimension must be given", path="TimeToy.featX")
    expect_error(root, "not a whole number", path="TimeToy.featX", dim=7)
    dataset = build_dataset(toy_config(root, path="TimeToy.featX", dim=8), "TimeToy")
    reference = build_dataset(toy_config(root), "TimeToy")
    assert torch.equal(dataset.item_features["text"], reference.item_features["text"])


def test_pt_format_equals_npy(toy):
    root, target, features = toy
    torch.save(torch.from_numpy(features), target / "TimeToy.text.pt")
    dataset = build_dataset(toy_config(root, path="TimeToy.text.pt"), "TimeToy")
    reference = build_dataset(toy_config(root), "TimeToy")
    assert torch.equal(dataset.item_features["text"], reference.item_features["text"])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_name_the_items(toy, bad_value):
    root, target, features = toy
    broken = features.copy()
    broken[4, 2] = bad_value
    write_table(target / "nan.npy", broken)
    message = expect_error(root, "NaN/inf", path="nan.npy")
    token_of_row_4 = [line.split("\t")[0] for line in (target / "TimeToy.item2index").read_text().splitlines()][4]
    assert token_of_row_4 in message


def test_tokens_without_rows(toy):
    root, target, _ = toy
    lines = (target / "TimeToy.item2index").read_text().splitlines()
    # drop one token from the index but keep the table consistent in length by adding a stray token
    dropped = lines[0].split("\t")[0]
    (target / "TimeToy.item2index").write_text("\n".join(["STRAY\t0"] + lines[1:]) + "\n")
    message = expect_error(root, "have no row", path="TimeToy.text.npy")
    assert dropped in message and "allow_missing" in message


def test_unreadable_file(toy):
    root, target, _ = toy
    (target / "garbage.npy").write_bytes(b"not a numpy file at all")
    expect_error(root, "cannot read", path="garbage.npy")


def test_missing_rows_need_allow_missing_and_are_masked(toy):
    root, target, features = toy
    mask = np.ones(len(features), dtype=bool)
    mask[[1, 5]] = False
    zeroed = features.copy()
    zeroed[[1, 5]] = np.nan  # masked rows may hold anything; they must not be read
    write_table(target / "img.npy", zeroed)
    np.save(target / "img.mask.npy", mask)
    expect_error(root, "marked missing", path="img.npy", mask="img.mask.npy")
    dataset = build_dataset(toy_config(root, path="img.npy", mask="img.mask.npy", allow_missing=True), "TimeToy")
    row_of = {line.split("\t")[0]: int(line.split("\t")[1])
              for line in (target / "TimeToy.item2index").read_text().splitlines()}
    table, present = dataset.item_features["text"], dataset.item_feature_masks["text"]
    for internal_id, token in enumerate(dataset.field2id_token["item_id"][1:], start=1):
        row = row_of[token]
        assert bool(present[internal_id]) == bool(mask[row])
        expected = features[row] if mask[row] else np.zeros(features.shape[1], np.float32)
        assert np.array_equal(table[internal_id].numpy(), expected)


def test_unknown_modality_is_named(toy):
    root, _, _ = toy
    config = toy_config(root)
    config["modalities"] = ["audio"]
    with pytest.raises(RecboleMMError, match="Modality 'audio'.*feature_tables.audio"):
        build_dataset(config, "TimeToy")


PEAK_MEMORY_PROBE = """
import re, sys
from pathlib import Path
import numpy as np
from recbole_mm.data.features import FeatureTableSpec, load_feature_table

def kib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

path, n_rows = sys.argv[1], int(sys.argv[2])
tokens = np.array(["[PAD]"] + [str(i) for i in np.random.default_rng(1).permutation(n_rows)])
spec = FeatureTableSpec(name="big", path=Path(path))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM) to the current one
before = kib("VmRSS")
table, mask, _ = load_feature_table(spec, tokens, None)
print((kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak resident size from /proc")
def test_large_table_is_copied_once(tmp_path):
    """mmap + chunked gather: the process's peak resident memory (every allocation, numpy's and
    torch's alike) grows by one copy of the table plus the file's mapped pages, not by two copies."""
    import subprocess
    import sys

    n_rows, dim = 60_000, 128
    table = np.random.default_rng(0).standard_normal((n_rows, dim)).astype(np.float32)
    np.save(tmp_path / "big.npy", table)
    del table
    rows = np.load(tmp_path / "big.npy", mmap_mode="r")
    spec = FeatureTableSpec(name="big", path=tmp_path / "big.npy")
    from recbole_mm.data.features import open_feature_file

    assert isinstance(open_feature_file(spec), np.memmap)  # read through the page cache, not into memory
    probe = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PROBE, str(tmp_path / "big.npy"), str(n_rows)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    peak_growth = int(probe.stdout.split()[-1])
    one_copy = (n_rows + 1) * dim * 4
    file_pages = (tmp_path / "big.npy").stat().st_size  # mapped while copied; the kernel may drop them
    # measured: file pages + 1.34 table sizes (the chunk buffers and 60,000 token strings are the 0.34)
    assert peak_growth < file_pages + 1.5 * one_copy, f"peak grew by {peak_growth / one_copy:.2f} table sizes"
    tokens = np.array(["[PAD]"] + [str(i) for i in np.random.default_rng(1).permutation(n_rows)])
    result, mask, _ = load_feature_table(spec, tokens, None)
    assert result.shape == (n_rows + 1, dim) and mask[1:].all()
    for internal_id in (1, 777, n_rows):
        assert np.array_equal(result[internal_id].numpy(), rows[int(tokens[internal_id])])


@pytest.mark.parametrize("model", ["MMSASRec", "SASRec"])
def test_long_benchmark_histories_keep_their_most_recent_items(scientific_slice, scientific_dir, model):
    config_dict = scientific_slice_config(scientific_slice, MAX_ITEM_LIST_LENGTH=3)
    config_obj = Config(model, "SciSlice", config_dict=config_dict)
    dataset = create_dataset(config_obj)
    train_data, _, test_data = data_preparation(config_obj, dataset)
    raw = {}
    for line in (scientific_dir / "Scientific.test.inter").read_text().splitlines()[1:]:
        user, history, _ = line.split("\t")
        raw[user] = history.split()
    tokens = dataset.field2id_token["item_id"]
    users = dataset.field2id_token["user_id"]
    for batch in test_data:
        interaction = batch[0]
        assert interaction["item_id_list"].shape[1] == 3
        for user, items, length in zip(interaction["user_id"], interaction["item_id_list"], interaction["item_length"]):
            expected = raw[users[user]][-3:]
            assert [tokens[i] for i in items[:length]] == expected
    for interaction in train_data:  # and a model with 3 position embeddings trains on it
        from recbole_mm.utils import get_model

        model_obj = get_model(model)(config_obj, train_data.dataset)
        model_obj.calculate_loss(interaction).backward()
        break
