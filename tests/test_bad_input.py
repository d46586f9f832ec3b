"""Bad input, case by case (the audit table in docs/reliability.md, "Bad input files").

Each row writes one flawed input (a missing file or column, a wrong type, NaN/inf, a repeated id, an empty
file, a .npy of the wrong shape) and states what must happen:
- files a run reads (the dataset's atomic files, feature tables, candidate files, config files): a
  ``RecboleMMError`` (exit 2 at the command line) whose message names the file, the field and the fix;
- converters: exit status 2 and one paragraph naming the file and the fix, with nothing written or removed
  (every file under the test folder byte for byte as before), or, for a flawed row inside a usable file,
  the row dropped and counted with its file:line in the manifest.
"""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_conversion import amazon, download_images, llara, llmrank, movielens, rechorus, unisrec
from dataset_conversion.common import load_manifest, run_converter
from dataset_conversion.encode_features import encode_text_modality
from recbole_mm.config import Config
from recbole_mm.data.atomic_files import check_atomic_files
from recbole_mm.data.candidates import CandidateFile
from recbole_mm.data.features import FeatureTableSpec, feature_rows_for_tokens, load_feature_table, read_mask
from recbole_mm.utils import RecboleMMError
from tests.test_dataset_conversion_rechorus import write_toy_rechorus

TOKENS = ["[PAD]", "a", "b", "c"]  # a dataset's item tokens, internal id order (0 = padding)


# ----------------------------------------------------------------------------------------------
# Feature tables (recbole_mm/data/features.py)
# ----------------------------------------------------------------------------------------------
def feature_folder(tmp, features=None, item2index="a\t0\nb\t1\nc\t2\n", mask=None):
    np.save(tmp / "D.text.npy", np.arange(12, dtype=np.float32).reshape(3, 4) if features is None else features)
    if item2index is not None:
        (tmp / "D.item2index").write_bytes(item2index if isinstance(item2index, bytes) else item2index.encode())
    if mask is not None:
        np.save(tmp / "D.text.mask.npy", mask)
    return tmp


def load_table(tmp, **entry):
    entry = {"path": "D.text.npy", **entry}
    spec = FeatureTableSpec.from_config("text", entry, tmp)
    return load_feature_table(spec, TOKENS, tmp / "D.item2index")


def nan_row(value):
    features = np.ones((3, 4), dtype=np.float32)
    features[1, 2] = value
    return features


FEATURE_CASES = {
    "missing file": (lambda t: load_table(feature_folder(t), path="D.image.npy"),
                     ["D.image.npy", "does not exist", "feature_tables.text.path"]),
    "1-d .npy": (lambda t: load_table(feature_folder(t, features=np.zeros(12, np.float32))),
                 ["D.text.npy", "shape (12,)", "expected (items, dim)", "Re-encode"]),
    "zero-width .npy": (lambda t: load_table(feature_folder(t, features=np.zeros((3, 0), np.float32))),
                        ["D.text.npy", "shape (3, 0)", "dim >= 1"]),
    "text values": (lambda t: load_table(feature_folder(t, features=np.array([["x"] * 4] * 3)))
                    , ["D.text.npy", "<U1", "not numbers", "Re-encode"]),
    "fewer rows than items": (lambda t: load_table(feature_folder(t, features=np.zeros((2, 4), np.float32))),
                              ["D.text.npy", "2 rows", "lists 3 items", "Re-run the conversion"]),
    "NaN value": (lambda t: load_table(feature_folder(t, features=nan_row(np.nan))),
                  ["D.text.npy", "NaN/inf", "['b']", "mask"]),
    "inf value": (lambda t: load_table(feature_folder(t, features=nan_row(np.inf))),
                  ["D.text.npy", "NaN/inf", "['b']", "mask"]),
    "dim differs from the config": (lambda t: load_table(feature_folder(t), dim=8),
                                    ["D.text.npy", "dimension 4", "dim: 8", "feature_tables.text.dim"]),
    "dim of the wrong type": (lambda t: load_table(feature_folder(t), dim="4"),
                              ["feature_tables.text.dim", "'4'", "a positive integer"]),
    "allow_missing of the wrong type": (lambda t: load_table(feature_folder(t), allow_missing="no"),
                                        ["feature_tables.text.allow_missing", "'no'", "true or false"]),
    "mask of the wrong length": (lambda t: load_table(feature_folder(t, mask=np.ones(2, bool)), mask="D.text.mask.npy"),
                                 ["D.text.mask.npy", "shape (2,)", "expected (3,)"]),
    "mask with values other than 0/1": (
        lambda t: load_table(feature_folder(t, mask=np.array([1.0, 0.5, 1.0])), mask="D.text.mask.npy"),
        ["D.text.mask.npy", "other than 0/1", "(e.g. 0.5 at row 1)"]),
    "mask of text": (lambda t: load_table(feature_folder(t, mask=np.array(["1", "0", "1"])), mask="D.text.mask.npy"),
                     ["D.text.mask.npy", "other than 0/1", "'1' at row 0", "Re-encode the features (the encoder writes "
                      "both files) or fix feature_tables.text.mask."]),
    # np.save pickles an object array; a mask is never unpickled
    "pickled mask": (lambda t: load_table(feature_folder(t, mask=np.array([1, 0, None], dtype=object)),
                                          mask="D.text.mask.npy"),
                     ["D.text.mask.npy", "cannot read mask", "allow_pickle=False"]),
    "mask file missing": (lambda t: load_table(feature_folder(t), mask="D.text.mask.npy"),
                          ["D.text.mask.npy", "does not exist", "(feature_tables.text.mask)"]),
    "item masked out": (lambda t: load_table(feature_folder(t, mask=np.array([True, False, True])),
                                             mask="D.text.mask.npy"),
                        ["1 items are marked missing by the mask of ", "D.text.npy", "['b']", "allow_missing: true"]),
    # as many index lines as table rows, but one row number past the table's end
    "item2index row past the table": (lambda t: load_table(feature_folder(t, item2index="a\t0\nb\t1\nc\t3\n")),
                                      ["1 items have no row in ", "D.text.npy", "['c']"]),
    "mask not a .npy": (lambda t: (t / "D.text.mask.npy").write_text("1 1 1") and load_table(
        feature_folder(t), mask="D.text.mask.npy"), ["D.text.mask.npy", "cannot read mask"]),
    "item2index token twice": (lambda t: load_table(feature_folder(t, item2index="a\t0\nb\t1\nb\t2\n")),
                               ["D.item2index", "line 3", "'b' is listed again",
                                "Regenerate it with dataset_conversion/ (one line per item, rows 0..N-1)."]),
    "item2index row twice": (lambda t: load_table(feature_folder(t, item2index="a\t0\nb\t1\nc\t1\n")),
                             ["D.item2index", "line 3", "row 1 is given again", "Regenerate"]),
    "item2index empty": (lambda t: load_table(feature_folder(t, item2index="")), ["D.item2index", "is empty"]),
    "item2index malformed line": (lambda t: load_table(feature_folder(t, item2index="a\t0\nb 1\n")),
                                  ["D.item2index", "line 2", "token<TAB>row"]),
    "item2index not UTF-8": (lambda t: load_table(feature_folder(t, item2index=b"a\t0\n\xff\t1\n")),
                             ["D.item2index", "not UTF-8"]),
    "items without a row": (lambda t: load_table(feature_folder(t, features=np.ones((2, 4), np.float32),
                                                                item2index="a\t0\nb\t1\n")),
                            ["D.text.npy", "1 items have no row", "['c']", "allow_missing"]),
    "raw float32 of the wrong size": (lambda t: (t / "D.feat1CLS").write_bytes(b"\0" * 10) and load_table(
        feature_folder(t), path="D.feat1CLS", dim=4), ["D.feat1CLS", "10 bytes", "truncated"]),
    ".pt without a tensor": (lambda t: torch.save({"x": 1}, t / "D.text.pt") or load_table(
        feature_folder(t), path="D.text.pt"), ["D.text.pt", "expected a tensor"]),
}


@pytest.mark.parametrize("mask", [np.array([True, False, True]), np.array([[1], [0], [1]], dtype=np.int8),
                                  np.array([1.0, 0.0, 1.0])], ids=["bool", "int8 column", "float"])
def test_a_mask_of_bools_or_of_0_1_numbers_in_one_column_marks_the_items(mask, tmp_path):
    _, present, _ = load_table(feature_folder(tmp_path, mask=mask), mask="D.text.mask.npy", allow_missing=True)
    assert present.tolist() == [False, True, False, True]  # padding, a, b (masked out), c
    spec = FeatureTableSpec.from_config("text", {"path": "D.text.npy", "mask": "D.text.mask.npy"}, tmp_path)
    read = read_mask(spec, 3)
    assert read.dtype == bool and read.tolist() == [True, False, True]


def test_feature_rows_for_tokens_maps_and_refuses_with_the_fix_written_out(tmp_path):
    import re

    index = tmp_path / "D.item2index"
    index.write_text("a\t0\nb\t1\n")
    rows, how, expected = feature_rows_for_tokens(["b", "z", "a"], index)
    assert rows.tolist() == [1, -1, 0] and how == f"rows from {index}" and expected == 2  # -1: no row
    rows, how, _ = feature_rows_for_tokens(["1", "0"], index)  # UniSRec layout: tokens are the rows
    assert rows.tolist() == [1, 0] and how == f"item tokens are rows of {index}"
    with pytest.raises(RecboleMMError, match=re.escape(
            f"Item tokens do not match {index}: e.g. ['x', 'y', 'w'] are neither its keys nor its row numbers. "
            "Regenerate item2index with dataset_conversion/ or remove it to map integer tokens to rows directly.")):
        feature_rows_for_tokens(["x", "y", "w", "v"], index)
    index.write_text("")
    with pytest.raises(RecboleMMError, match=re.escape(
            f"{index} is empty: it must list every item's feature row ('token<TAB>row'). Regenerate it with "
            "dataset_conversion/, or remove it when the item tokens are the row numbers.")):
        feature_rows_for_tokens(["a"], index)
    missing = tmp_path / "none.item2index"
    with pytest.raises(RecboleMMError, match=re.escape(
            f"No item2index file at {missing}, and item tokens such as ['x'] are not row numbers. "
            "Provide <dataset>.item2index (token<TAB>row) next to the atomic files.")):
        feature_rows_for_tokens(["3", "x", "5"], missing)
    rows, how, expected = feature_rows_for_tokens(["3", "5"], missing)
    assert rows.tolist() == [3, 5] and how == "item tokens are row numbers" and expected is None


def test_blank_lines_in_item2index_are_skipped_wherever_they_are(tmp_path):
    table, present, _ = load_table(feature_folder(tmp_path, item2index="a\t0\n\nb\t1\n  \nc\t2\n"))
    assert present.tolist() == [False, True, True, True]
    assert table[3].tolist() == [8.0, 9.0, 10.0, 11.0]  # c's row 2


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_feature_table_bad_input(case, tmp_path):
    read, fragments = FEATURE_CASES[case]
    with pytest.raises(RecboleMMError) as error:
        read(tmp_path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# ----------------------------------------------------------------------------------------------
# Candidate files (recbole_mm/data/candidates.py CandidateFile)
# ----------------------------------------------------------------------------------------------
USERS = {"u1": 1, "u2": 2}
ITEMS = {token: n for n, token in enumerate("abcdef", 1)}


def candidate_file(tmp, text, num_candidates=None):
    path = tmp / "D.random"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return CandidateFile(path, USERS, ITEMS, num_candidates=num_candidates)


CANDIDATE_CASES = {
    "missing file": (lambda t: CandidateFile(t / "none.random", USERS, ITEMS), ["none.random", "does not exist"]),
    "empty file": (lambda t: candidate_file(t, ""), ["D.random", "no candidate line", "regenerate"]),
    "malformed line": (lambda t: candidate_file(t, "u1 a b\n"), ["D.random", "malformed lines", "D.random:1"]),
    "unknown item": (lambda t: candidate_file(t, "u1\ta zz\n"), ["items unknown to the dataset", "D.random:1 (zz"]),
    "unknown user": (lambda t: candidate_file(t, "u9\ta b\n"), ["users unknown to the dataset", "D.random:1 (u9)"]),
    "user on two lines": (lambda t: candidate_file(t, "u1\ta b\nu1\tc d\n"), ["more than one line", "D.random:2"]),
    "item twice in a line": (lambda t: candidate_file(t, "u1\ta a\n"), ["listing an item twice", "D.random:1"]),
    "not UTF-8": (lambda t: candidate_file(t, b"u1\ta \xff\n"), ["D.random", "not UTF-8"]),
    "num_candidates below 2": (lambda t: candidate_file(t, "u1\ta b\n", num_candidates=1),
                               ["num_candidates=1", "2 or more"]),
}


@pytest.mark.parametrize("case", list(CANDIDATE_CASES))
def test_candidate_file_bad_input(case, tmp_path):
    read, fragments = CANDIDATE_CASES[case]
    with pytest.raises(RecboleMMError) as error:
        read(tmp_path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# ----------------------------------------------------------------------------------------------
# Config files (recbole_mm/config)
# ----------------------------------------------------------------------------------------------
def config_from(tmp, text):
    path = tmp / "run.yaml"
    path.write_text(text)
    return Config("SASRec", "Scientific", [str(path)])


CONFIG_CASES = {
    "missing file": (lambda t: Config("SASRec", "Scientific", [str(t / "none.yaml")]), ["none.yaml", "not found"]),
    "not YAML": (lambda t: config_from(t, "a: [1\n"), ["run.yaml", "not valid YAML"]),
    "not a mapping": (lambda t: config_from(t, "- 1\n- 2\n"), ["run.yaml", "not 'key: value'"]),
    "key given twice": (lambda t: config_from(t, "learning_rate: 0.01\nepochs: 2\nlearning_rate: 0.1\n"),
                        ["run.yaml", "learning_rate is given twice (lines 1 and 3)", "Keep the one"]),
    "NaN number": (lambda t: config_from(t, "learning_rate: .nan\n"), ["learning_rate in config file", "run.yaml",
                                                                        "must be finite"]),
    "inf number": (lambda t: config_from(t, "weight_decay: .inf\n"), ["weight_decay", "must be finite"]),
    "wrong type": (lambda t: config_from(t, "epochs: many\n"), ["epochs", "'many'", "an integer"]),
    "unknown key": (lambda t: config_from(t, "hiden_size: 8\n"), ["hiden_size", "did you mean hidden_size"]),
    "value RecBole refuses: eval mode": (lambda t: config_from(t, "eval_args: {mode: sideways}\n"),
                                         ["RecBole refuses", "mode [sideways]", "Fix that setting"]),
    "value RecBole refuses: metric": (lambda t: config_from(t, "metrics: [Nonsense]\n"),
                                      ["RecBole refuses", "no metric named 'Nonsense'"]),
    "value RecBole refuses: topk": (lambda t: config_from(t, "topk: [0]\n"), ["RecBole refuses", "topk", "`0`"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_file_bad_input(case, tmp_path):
    read, fragments = CONFIG_CASES[case]
    with pytest.raises(RecboleMMError) as error:
        read(tmp_path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# ----------------------------------------------------------------------------------------------
# The dataset's atomic files (recbole_mm/data/atomic_files.py, before RecBole reads them)
# ----------------------------------------------------------------------------------------------
INTER = ["user_id:token\titem_id:token\ttimestamp:float", "u1\ta\t10", "u1\tb\t20", "u2\ta\t15", "u2\tc\t30"]
LOAD = {"inter": ["user_id", "item_id", "timestamp"]}


def dataset(tmp, inter=INTER, item=None, raw=None, **config):
    folder = tmp / "data" / "D"
    folder.mkdir(parents=True)
    if raw is not None:
        (folder / "D.inter").write_bytes(raw)
    elif inter is not None:
        (folder / "D.inter").write_text("\n".join(inter) + "\n")
    if item is not None:
        (folder / "D.item").write_text("\n".join(item) + "\n")
    check_atomic_files(Config("SASRec", "D", config_dict={"data_path": str(tmp / "data"), "load_col": LOAD, **config}))


def replaced(line_number, text, lines=INTER):
    return [text if n == line_number else line for n, line in enumerate(lines, 1)]


ITEM = ["item_id:token\tprice:float", "a\t1.5", "b\t2", "c\t3"]
ATOMIC_CASES = {
    "missing .inter": (lambda t: dataset(t, inter=None), ["D.inter does not exist", "Convert the dataset"]),
    "missing pre-split file": (lambda t: dataset(t, benchmark_filename=["train", "valid", "test"], TIME_FIELD=None),
                               ["D.train.inter does not exist", "benchmark_filename"]),
    "zero-byte file": (lambda t: dataset(t, raw=b""), ["D.inter is empty", "header line"]),
    "header only": (lambda t: dataset(t, inter=INTER[:1]), ["D.inter has a header but no rows"]),
    "unknown column type": (lambda t: dataset(t, inter=[INTER[0].replace(":float", ":date")] + INTER[1:]),
                            ["D.inter, header", "'timestamp:date'", "Fix the header"]),
    "load_col names a missing column": (
        lambda t: dataset(t, inter=[line.rsplit("\t", 1)[0] for line in INTER]),
        ["D.inter has no column timestamp", "load_col.inter"]),
    "TIME_FIELD not loaded": (lambda t: dataset(t, load_col={"inter": ["user_id", "item_id"]}),
                              ["TIME_FIELD is timestamp", "leaves out its timestamp column", "TIME_FIELD: ~"]),
    "id column not loaded": (lambda t: dataset(t, load_col={"inter": ["user_id", "timestamp"]}),
                             ["D.inter", "id column item_id is not loaded", "load_col.inter"]),
    "NaN timestamp": (lambda t: dataset(t, inter=replaced(3, "u1\tb\tnan")),
                      ["D.inter", "column timestamp is not a finite number", "line 3", "column's mean"]),
    "empty timestamp": (lambda t: dataset(t, inter=replaced(3, "u1\tb\t")),
                        ["D.inter", "column timestamp is not a finite number", "line 3"]),
    "inf timestamp": (lambda t: dataset(t, inter=replaced(4, "u2\ta\tinf")),
                      ["D.inter", "column timestamp is not a finite number", "line 4"]),
    "text in a float column": (lambda t: dataset(t, inter=replaced(2, "u1\ta\tyesterday")),
                               ["D.inter", "column timestamp is not a finite number", "line 2 ('yesterday')"]),
    "empty user id": (lambda t: dataset(t, inter=replaced(5, "\tc\t30")),
                      ["D.inter", "column user_id is empty", "line 5", "padding id"]),
    "row with an extra field": (lambda t: dataset(t, inter=replaced(3, "u1\tb\t20\tx")),
                                ["D.inter", "line 3", "another number of", "fields than the header's 3"]),
    "not UTF-8": (lambda t: dataset(t, raw=b"user_id:token\titem_id:token\ttimestamp:float\nu\xff\ta\t1\n"),
                  ["D.inter", "not utf-8 text"]),
    ".item id twice": (lambda t: dataset(t, item=ITEM + ["b\t4"], load_col={**LOAD, "item": ["item_id", "price"]}),
                       ["D.item", "column item_id repeats an earlier row's id", "line 5 ('b')", "one row per id"]),
    ".item NaN float": (lambda t: dataset(t, item=replaced(3, "b\tnan", ITEM), load_col={**LOAD, "item": ["item_id", "price"]}),
                        ["D.item", "column price is not a finite number", "line 3", "load_col.item"]),
    "load_col.item without a .item file": (lambda t: dataset(t, load_col={**LOAD, "item": ["item_id", "price"]}),
                                           ["load_col.item", "D.item", "does not exist"]),
}


@pytest.mark.parametrize("case", list(ATOMIC_CASES))
def test_atomic_file_bad_input(case, tmp_path):
    read, fragments = ATOMIC_CASES[case]
    with pytest.raises(RecboleMMError) as error:
        read(tmp_path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_clean_atomic_files_pass(tmp_path):
    dataset(tmp_path, item=ITEM, load_col={**LOAD, "item": ["item_id", "price"]})


# ----------------------------------------------------------------------------------------------
# Converters (dataset_conversion/*.py): exit 2, one paragraph, nothing written or removed
# ----------------------------------------------------------------------------------------------
class HashingTextEncoder:
    label, backend, precision = "test-hash", "test", "float32"

    def encode(self, texts, batch_size, show_progress):
        return np.array([[len(text), 1.0] for text in texts], dtype=np.float32)


def converted_folder(tmp, item2index="a\t0\nb\t1\n", item="item_id:token\ttext:token_seq\na\tone\nb\ttwo\n",
                     field="text"):
    folder = tmp / "D"
    folder.mkdir()
    (folder / "D.item2index").write_text(item2index)
    (folder / "D.item").write_text(item)
    return lambda argv: encode_text_modality(folder, "D", "text", field, HashingTextEncoder(), show_progress=False)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def amazon_main(tmp, reviews_name, reviews):
    write(tmp / reviews_name, reviews)
    return lambda argv: amazon.main(["--reviews", str(tmp / reviews_name), "--dataset", "X", "--output_dir",
                                     str(tmp / "out"), "--keep_items_without_meta", "--k", "1"])


def movielens_main(tmp, files):
    for name, text in files.items():
        write(tmp / "raw" / name, text)
    return lambda argv: movielens.main(["ml-1m", "--raw_dir", str(tmp / "raw"), "--no_encode", "--output_dir",
                                        str(tmp / "out"), "--dataset", "ml-toy"])


def converter(module, *argv):
    return lambda tmp: (lambda _: module.main([arg.replace("{tmp}", str(tmp)) for arg in argv]))


CONVERTER_CASES = {
    "amazon: damaged gzip": (lambda t: amazon_main(t, "X_5.json.gz", gzip.compress(b'{"asin": "a"}\n' * 50)[:40]),
                             ["X_5.json.gz", "damaged or truncated gzip", "download it again"]),
    "amazon: reviews file missing": (converter(amazon, "--reviews", "{tmp}/none.json.gz", "--dataset", "X",
                                               "--output_dir", "{tmp}/out", "--keep_items_without_meta"),
                                     ["none.json.gz", "not found"]),
    "movielens: empty ratings file": (lambda t: movielens_main(t, {"u.data": "", "u.item": "1|A|x|y|z" + "|0" * 19 + "\n"}),
                                      ["u.data", "no rating line"]),
    "movielens: atomic file without a column": (
        lambda t: movielens_main(t, {"ml-1m.inter": "user_id:token\titem_id:token\n1\t1\n",
                                     "ml-1m.item": "item_id:token\tmovie_title:token_seq\n1\tA\n"}),
        ["ml-1m.inter", "no column(s) ['rating', 'timestamp']"]),
    "movielens: zero-byte atomic .inter": (
        lambda t: movielens_main(t, {"ml-1m.inter": "", "ml-1m.item": "item_id:token\tmovie_title:token_seq\n1\tA\n"}),
        ["ml-1m.inter", "cannot be read as a tab-separated table"]),
    "movielens: no layout in the folder": (lambda t: movielens_main(t, {"notes.txt": "x"}),
                                           ["no MovieLens layout found", "--raw_dir"]),
    "llara: files missing": (converter(llara, "--raw_dir", "{tmp}/raw", "--no_encode", "--output_dir", "{tmp}/out"),
                             ["train_data.df", "id2name.txt", "--raw_dir"]),
    "llmrank: files missing": (converter(llmrank, "--raw_dir", "{tmp}/raw", "--no_encode", "--output_dir", "{tmp}/out"),
                               ["lastfm.inter", "--raw_dir"]),
    "rechorus: files missing": (converter(rechorus, "--raw_dir", "{tmp}", "--no_encode", "--output_dir", "{tmp}/out"),
                                ["<Name>.item2index", "--raw_name"]),
    "unisrec: ASIN twice in the index": (
        lambda t: write(t / "Sci" / "Sci.item2index", "A1\t0\nA2\t1\nA1\t2\n") and converter(
            unisrec, "--source", "{tmp}/Sci", "--output_dir", "{tmp}/out")(t),
        ["Sci.item2index:3", "ASIN A1 is listed again"]),
    "download_images: token twice in the URL list": (
        lambda t: write(t / "urls.tsv", "a\thttp://x/a.jpg\na\thttp://x/b.jpg\n") and converter(
            download_images, "--url_list", "{tmp}/urls.tsv", "--image_dir", "{tmp}/img")(t),
        ["urls.tsv:2", "'a' is listed again", "one URL per item"]),
    "download_images: empty URL list": (
        lambda t: write(t / "urls.tsv", "\n") and converter(
            download_images, "--url_list", "{tmp}/urls.tsv", "--image_dir", "{tmp}/img")(t),
        ["urls.tsv", "lists no"]),
    "encode: item2index token twice": (lambda t: converted_folder(t, item2index="a\t0\na\t1\n"),
                                       ["D.item2index:2", "'a' is listed again", "regenerate"]),
    "encode: item2index empty": (lambda t: converted_folder(t, item2index=""), ["D.item2index is empty", "converter"]),
    "encode: .item id twice": (lambda t: converted_folder(t, item="item_id:token\ttext:token_seq\na\tone\na\tuno\n"),
                               ["D.item:3", "'a' is listed again", "regenerate"]),
    "encode: field missing": (lambda t: converted_folder(t, field="title"), ["D.item", "no field 'title'"]),
}


def snapshot(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", list(CONVERTER_CASES))
def test_converter_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    make, fragments = CONVERTER_CASES[case]
    main = make(tmp_path)
    write(tmp_path / "out" / "X" / "X.inter", "an earlier conversion\n")  # must survive untouched
    before = snapshot(tmp_path)
    assert run_converter(main, []) == 2
    stderr = capsys.readouterr().err
    message = stderr.strip().splitlines()[-1]  # after any progress bar
    assert "Traceback" not in stderr and message.startswith(f"{Path(sys.argv[0]).name}: error: "), stderr
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Converters: a flawed row inside a usable file is dropped and counted with its file:line
# ----------------------------------------------------------------------------------------------
def amazon_csv(tmp):
    rows = ["a,u1,5,100", "b,u1,4,200", "a,u2,nan,150", "b,u2,3,inf", "c,u2,2,300"]  # lines 3, 4 are non-finite
    write(tmp / "X.csv", "\n".join(rows) + "\n")
    folder, _ = amazon.convert(tmp / "X.csv", None, "X", tmp / "out", 1, 1, keep_items_without_meta=True)
    return folder / "X.inter", load_manifest(folder, "X")["conversion"]["bad_input"]


def movielens_dat(tmp):
    write(tmp / "raw" / "ratings.dat", "1::1::5::100\n1::2::nan::200\n2::1::4::inf\n2::2::3::300\n")
    write(tmp / "raw" / "movies.dat", "1::A (1999)::Drama\n2::B (2000)::Comedy\n2::B again::Horror\n")
    folder, _, _ = movielens.convert("ml-1m", tmp / "raw", tmp / "out", "ml-toy")
    return folder / "ml-toy.inter", load_manifest(folder, "ml-toy")["conversion"]["bad_input"]


def llmrank_inter(tmp):
    write(tmp / "raw" / "lastfm.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                                        "1\t1\t1\n1\t2\t2\n1\t3\tinf\n2\t1\tnan\n2\t2\t5\n")
    write(tmp / "raw" / "lastfm.item", "item_id:token\tmovie_title:token_seq\n1\tOne\n2\tTwo\n3\tThree\n")
    write(tmp / "raw" / "lastfm.random", "1\t3 2\n")
    folder, _ = llmrank.convert(tmp / "raw", tmp / "out", "toy")
    return folder / "toy.inter", load_manifest(folder, "toy")["conversion"]["bad_input"]


def rechorus_times(tmp):
    raw = write_toy_rechorus(tmp / "raw")
    lines = (raw / "train.csv").read_text().splitlines()
    (raw / "train.csv").write_text("\n".join(lines[:3] + ["3\t4\tnan"] + lines[4:]) + "\n")  # line 4: NaN time
    folder, _ = rechorus.convert(raw, "Toy", tmp / "out")
    return folder / "Toy.inter", load_manifest(folder, "Toy")["conversion"]["bad_input"]


COUNTED_CASES = {
    # converter: (run, {kind: first locations}, rows expected in the written .inter)
    "amazon csv: NaN rating, inf time": (amazon_csv, {
        "ratings csv: non-numeric or non-finite rating/timestamp (skipped)": ["X.csv:3", "X.csv:4"]}, 3),
    "movielens: NaN rating, inf time, repeated movie": (movielens_dat, {
        "ratings without a finite numeric timestamp (skipped)": ["rating row 3"],
        "ratings without a finite numeric rating (skipped)": ["rating row 2"],
        "movies.dat: repeated movie id (first kept)": ["movies.dat:3"]}, 2),
    "llmrank: inf and NaN timestamps": (llmrank_inter, {
        "lastfm.inter: non-numeric or non-finite timestamp (skipped)": ["lastfm.inter:4", "lastfm.inter:5"]}, 3),
    "rechorus: NaN time": (rechorus_times, {"train.csv: malformed row (skipped)": ["train.csv:4", "train.csv:6"]}, None),
}


@pytest.mark.parametrize("case", list(COUNTED_CASES))
def test_converter_drops_and_counts_flawed_rows(case, tmp_path):
    convert, expected, n_rows = COUNTED_CASES[case]
    inter, bad_input = convert(tmp_path)
    for kind, first in expected.items():
        assert bad_input[kind]["first"] == first, json.dumps(bad_input, indent=1)
    rows = inter.read_text().splitlines()[1:]
    assert not any(value in ("nan", "inf", "-inf") for row in rows for value in row.split("\t")), rows
    if n_rows is not None:
        assert len(rows) == n_rows


def test_converters_with_a_main_exit_2_from_the_command_line(tmp_path):
    """Their ``__main__`` goes through run_converter (exit 2 and one line, not a traceback)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    for script in ("llara", "llmrank", "rechorus"):
        done = subprocess.run([sys.executable, f"dataset_conversion/{script}.py", "--raw_dir", str(tmp_path / "none"),
                               "--no_encode", "--output_dir", str(tmp_path / "out")], cwd=root, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (script, done.stderr)
        assert str(tmp_path / "none") in done.stderr


# ----------------------------------------------------------------------------------------------
# Matrices given to the embedding-analysis tool (recbole_mm/tools/embedding_analysis.py)
# ----------------------------------------------------------------------------------------------
def spectrum_of(tmp, content, name="m.pt", key=":embedding"):
    if content is not None:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".npy"):
            np.save(path, content)
        else:
            torch.save(content, path)
    return ["spectrum", f"{tmp / name}{key}", "--out", str(tmp / "spec")]


TOOL_CASES = {
    "missing file": (lambda t: spectrum_of(t, None), ["m.pt does not exist", "file[:key.subkey]"]),
    "not a tensor file": (lambda t: spectrum_of(t, b"not a tensor"), ["m.pt", "cannot be read"]),
    "missing key": (lambda t: spectrum_of(t, {"other": torch.zeros(3, 2)}), ["m.pt", "no key 'embedding'", "other"]),
    "1-d tensor": (lambda t: spectrum_of(t, {"embedding": torch.zeros(3)}), ["not a 2-d tensor", "(3,)"]),
    "NaN values": (lambda t: spectrum_of(t, np.array([[1.0, np.nan], [0.0, 1.0]]), "m.npy", ""), ["m.npy", "NaN/inf"]),
}


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_embedding_analysis_bad_input_exits_2(case, tmp_path, capsys):
    from recbole_mm.tools.embedding_analysis import main

    argv, fragments = TOOL_CASES[case][0](tmp_path), TOOL_CASES[case][1]
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("embedding_analysis: error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    assert not list(tmp_path.glob("spec*"))
