"""ReChorus layout -> RecBole (dataset_conversion/rechorus.py) on the real Amazon 2014 Office files.

Expected values are computed here from the raw lines (csv rows, Python-literal negative lists); the
split check goes through RecBole's own leave-one-out split; the candidate metrics are recomputed by
brute force from the model's full-catalogue scores and the raw test.csv negatives.
"""
import ast
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_conversion import amazon, rechorus
from dataset_conversion.common import load_manifest
from tests.conftest import shared_dataset_dir

RAW = "raw/amazon2014-Office-rechorus"


@pytest.fixture(scope="module")
def office_raw():
    return shared_dataset_dir(RAW)


def read_raw_rows(path):
    """[(user, item, time, negatives or None)] straight from a ReChorus csv."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for line in lines[1:]:
        parts = line.split("\t")
        rows.append((int(parts[0]), int(parts[1]), int(parts[2]), ast.literal_eval(parts[3]) if len(parts) > 3 else None))
    return rows


def read_asins(raw_dir):
    return {int(index): asin for asin, index in (line.split("\t") for line in (raw_dir / "Office.item2index").read_text().splitlines())}


@pytest.fixture(scope="module")
def converted_office(office_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("office")
    dataset_dir, stats = rechorus.convert(office_raw, "Office", root)
    return root, dataset_dir, stats


def test_office_counts_and_sequences_match_the_raw_lines(office_raw, converted_office):
    _, dataset_dir, stats = converted_office
    train, dev, test = (read_raw_rows(office_raw / name) for name in ("train.csv", "dev.csv", "test.csv"))
    asin = read_asins(office_raw)
    assert (stats["users"], stats["items"], stats["interactions"]) == (
        len({u for u, *_ in train + dev + test}), len(asin), len(train) + len(dev) + len(test)) == (4905, 2420, 53258)
    expected = defaultdict(list)
    for rows in (train, dev, test):  # each user's train rows in file order, then dev, then test
        for user, item, time, _ in rows:
            expected[str(user)].append((asin[item], float(time)))
    written = defaultdict(list)
    lines = (dataset_dir / "Office.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    for line in lines[1:]:
        user, item, time = line.split("\t")
        written[user].append((item, float(time)))
    assert written == expected
    assert stats["time_min"] == min(t for *_, t, _ in train) and stats["time_max"] == max(t for _, _, t, _ in test)

    repeats = [len(negatives) - len(set(negatives)) for *_, negatives in dev + test]
    assert stats["candidate_sets"] == {"sets": len(dev) + len(test), "repeated_negatives": sum(repeats),
                                       "sets_with_repeats": sum(r > 0 for r in repeats)}
    texts = dict(line.split("\t", 1) for line in (office_raw / "Office.text").read_text().splitlines()[1:])
    assert stats["items_with_text"] == sum(1 for a in asin.values() if texts.get(a, "").strip())
    manifest = load_manifest(dataset_dir, "Office")
    assert manifest["conversion"]["parameters"]["converter"] == "rechorus"
    assert manifest["conversion"]["bad_input"] == {}
    assert "Office.candidates" in manifest["conversion"]["outputs"]


def test_recbole_leave_one_out_gives_the_files_dev_and_test_items(office_raw, converted_office):
    from recbole.data import data_preparation

    from recbole_mm.config import Config
    from recbole_mm.data import create_dataset

    root, _, _ = converted_office
    config = Config("SASRec", "Office", config_dict={
        "data_path": str(root), "modalities": [], "feature_tables": {}, "show_progress": False,
        "MAX_ITEM_LIST_LENGTH": 200})
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    asin = read_asins(office_raw)
    train = read_raw_rows(office_raw / "train.csv")
    history = defaultdict(list)
    for user, item, *_ in train:
        history[str(user)].append(asin[item])
    dev_item = {str(user): asin[item] for user, item, *_ in read_raw_rows(office_raw / "dev.csv")}
    for split_data, file in ((valid_data, "dev.csv"), (test_data, "test.csv")):
        split = split_data.dataset
        users = split.id2token("user_id", split.inter_feat["user_id"].numpy())
        targets = split.id2token("item_id", split.inter_feat["item_id"].numpy())
        expected = {str(user): asin[item] for user, item, *_ in read_raw_rows(office_raw / file)}
        assert len(users) == len(expected) == 4905
        assert dict(zip(users, targets)) == expected
        # the history RecBole feeds the model: every earlier interaction of the user, in the file's order
        sequences = split.inter_feat["item_id_list"].numpy()
        lengths = split.inter_feat["item_length"].numpy()
        for row in range(0, len(users), 37):
            got = list(split.id2token("item_id", sequences[row][: lengths[row]]))
            assert got == history[users[row]] + ([dev_item[users[row]]] if file == "test.csv" else [])


# ----------------------------------------------------------------------------------------------
# A slice of the real files (first users, all items) for training runs
# ----------------------------------------------------------------------------------------------
def write_office_slice(raw_dir, root, n_users, items_of_slice_only=False):
    """The real files restricted to users 1..n_users. items_of_slice_only: keep only the items those
    users touch (item2index, texts, negatives), so encoding stays small."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = {name: read_raw_rows(raw_dir / name) for name in ("train.csv", "dev.csv", "test.csv")}
    kept_items = {item for name in rows for user, item, *_ in rows[name] if user <= n_users}
    for name, header in (("train.csv", "user_id\titem_id\ttime"), ("dev.csv", "user_id\titem_id\ttime\tneg_items"),
                         ("test.csv", "user_id\titem_id\ttime\tneg_items")):
        lines = [header]
        for user, item, time, negatives in rows[name]:
            if user > n_users:
                continue
            fields = [str(user), str(item), str(time)]
            if negatives is not None:
                fields.append(str([n for n in negatives if n in kept_items] if items_of_slice_only else negatives))
            lines.append("\t".join(fields))
        (root / name).write_text("\n".join(lines) + "\n")
    item2index = (raw_dir / "Office.item2index").read_text().splitlines()
    text_lines = (raw_dir / "Office.text").read_text().splitlines()
    meta_lines = (raw_dir / "item_meta.csv").read_text().splitlines()
    if items_of_slice_only:
        asins = {line.split("\t")[0] for line in item2index if int(line.split("\t")[1]) in kept_items}
        item2index = [line for line in item2index if line.split("\t")[0] in asins]
        text_lines = text_lines[:1] + [line for line in text_lines[1:] if line.split("\t")[0] in asins]
        meta_lines = meta_lines[:1] + [line for line in meta_lines[1:] if int(line.split("\t")[0]) in kept_items]
    (root / "Office.item2index").write_text("\n".join(item2index) + "\n")
    (root / "Office.text").write_text("\n".join(text_lines) + "\n")
    (root / "item_meta.csv").write_text("\n".join(meta_lines) + "\n")
    return root


def test_candidate_metrics_equal_a_brute_force_ranking_over_the_files_100_items(office_raw, tmp_path, in_tmp_cwd):
    """HR@k / NDCG@k on the ReChorus sets (target + 99 negatives of test.csv) equal a brute-force
    ranking of the model's own full-catalogue scores on the raw negatives."""
    from recbole_mm.quick_start import build

    raw = write_office_slice(office_raw, tmp_path / "raw", n_users=150)
    rechorus.convert(raw, "Office", tmp_path / "data")
    topk = [1, 5, 10]
    config, (train_data, valid_data, test_data), model, trainer = build("SASRec", "Office", config_dict={
        "data_path": str(tmp_path / "data"), "modalities": [], "feature_tables": {}, "show_progress": False,
        # every catalogue item gets an id (the slice's users touch only some): the negatives need them
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "candidate_protocol": True, "candidate_file": "Office.candidates", "metrics": ["Hit", "NDCG"], "topk": topk,
        "valid_metric": "NDCG@10", "epochs": 1, "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "train_batch_size": 256, "eval_batch_size": 64})
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    dataset = test_data.dataset
    asin = read_asins(office_raw)
    negatives_of = {(str(u), asin[i]): [asin[n] for n in negs] for u, i, _, negs in read_raw_rows(raw / "test.csv")}
    ranks, full_ranks = [], []
    model.eval()
    with torch.no_grad():
        for batch in test_data:
            interaction = batch[0]
            scores = model.full_sort_predict(interaction.to(config["device"])).view(len(interaction), -1)
            for row in range(len(interaction)):
                user = dataset.id2token("user_id", int(interaction["user_id"][row]))
                target = dataset.id2token("item_id", int(interaction["item_id"][row]))
                candidates = {dataset.token2id("item_id", t) for t in negatives_of[(user, target)]}
                target_score = scores[row, dataset.token2id("item_id", target)]
                ranks.append(1 + sum(int(scores[row, c] > target_score) for c in candidates))
                full_ranks.append(1 + int((scores[row] > target_score).sum()))
    assert len(ranks) == 150 and len(set(ranks)) > 5  # a trained model: targets spread over the ranks
    assert result["hit@10"] > np.mean([rank <= 10 for rank in full_ranks])  # not the full-catalogue ranking
    for k in topk:
        hit = np.mean([rank <= k for rank in ranks])
        ndcg = np.mean([1 / math.log2(rank + 1) if rank <= k else 0.0 for rank in ranks])
        assert result[f"hit@{k}"] == pytest.approx(hit, abs=1e-4)
        assert result[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-4)


@pytest.fixture(scope="module")
def encoded_office_slice(office_raw, tmp_path_factory):
    """12 users of the real files, their items only, text encoded by the default encoder, attributes."""
    from dataset_conversion.encode_features import encode_text_modality, load_text_encoder

    root = tmp_path_factory.mktemp("office_slice")
    raw = write_office_slice(office_raw, root / "raw", n_users=12, items_of_slice_only=True)
    dataset_dir, stats = rechorus.convert(raw, "Office", root / "data")
    encode_text_modality(dataset_dir, "Office", "text", "text", load_text_encoder(device="cpu"), show_progress=False)
    rechorus.write_attribute_features(dataset_dir, "Office")
    return root / "data", stats


TINY_MMM4REC = {"hidden_size": 16, "inner_size": 16, "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8}
TINY_LLM = {"llm_hidden_size": 16, "llm_num_layers": 1, "llm_num_heads": 2}
# Office has no image: MMESID and Speeder, whose yamls name [text, image], get [text, attribute].
MODEL_SETTINGS = {
    "SASRec": {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1},
    "GRU4Rec": {"embedding_size": 16, "hidden_size": 16},
    "MMSASRec": {"hidden_size": 16, "inner_size": 32},
    "FMRLRec": {},
    "Speeder": {**TINY_LLM, "mome_hidden_size": 8, "mome_inner_size": 16, "stage_epochs": [1, 1, 1], "warmup_steps": 0,
                "modalities": ["text", "attribute"],
                "stage_modalities": [["text"], ["text", "attribute"], ["text", "attribute", "id"]],
                "id_sasrec": {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "epochs": 1,
                              "learning_rate": 0.001, "train_batch_size": 256}},
    "MMESID": {**TINY_LLM, "fusion_hidden_size": 8, "modalities": ["text", "attribute"], "rqvae_hidden_dims": [32],
               "rqvae_levels": 2, "rqvae_codebook_size": 8, "rqvae_epochs": 2, "rqvae_batch_size": 512,
               "rqvae_sinkhorn_epsilons": [0.0, 0.003],
               "collab_config": {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "epochs": 1,
                                 "loss_type": "CE", "train_neg_sample_args": None}},
}


@pytest.mark.parametrize("model", sorted(MODEL_SETTINGS))
def test_every_model_runs_on_office(encoded_office_slice, model, in_tmp_cwd):
    from recbole_mm.quick_start import run

    data, _ = encoded_office_slice
    config = {"data_path": str(data), "show_progress": False, "epochs": 1, "train_batch_size": 32,
              "eval_batch_size": 32, "mmesid_cache_dir": str(in_tmp_cwd / "cache"), **MODEL_SETTINGS[model]}
    result = run(model, "Office", config_dict=config, saved=False)
    assert result["test_result"] and all(np.isfinite(v) for v in result["test_result"].values())


def test_mmm4rec_runs_its_time_path_on_the_real_timestamps(encoded_office_slice, in_tmp_cwd, monkeypatch):
    from recbole_mm.model.mmm4rec import MMM4Rec
    from recbole_mm.quick_start import run

    data, stats = encoded_office_slice
    seen = []
    original = MMM4Rec.time_signal

    def recording_time_signal(self, timestamps, time_mask):
        seen.append((timestamps.detach().clone(), time_mask.detach().clone()))
        return original(self, timestamps, time_mask)

    monkeypatch.setattr(MMM4Rec, "time_signal", recording_time_signal)  # a spy: the real method still runs
    result = run("MMM4Rec", "Office", config_dict={
        "data_path": str(data), "show_progress": False, "epochs": 1, **TINY_MMM4REC, "ssd_impl": "torch_chunked",
        "train_batch_size": 32, "eval_batch_size": 32}, saved=False)
    assert np.isfinite(result["test_result"]["ndcg@10"])
    assert seen, "the time path never ran"
    timestamps, mask = seen[0]
    real = mask.bool()
    differences = timestamps[:, 1:] - timestamps[:, :-1]
    both_real = real[:, 1:] & real[:, :-1]
    # real review days (2000-2014), and real gaps between consecutive reviews (not a row counter)
    assert timestamps[real].min() >= stats["time_min"] and timestamps[real].max() <= stats["time_max"]
    assert (differences[both_real] >= 0).all() and (differences[both_real] % 86400 == 0).all()
    assert (differences[both_real] > 86400).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------
# Bad input, re-runs and the Office name shared with amazon.py
# ----------------------------------------------------------------------------------------------
ASINS = [f"B0TOY{n:05d}" for n in range(1, 9)]


def write_toy_rechorus(root, dev_time=500, extra_dev_line=None):
    """A small ReChorus folder with flawed rows; ids 1..8, items 1..7 have a text, item 8 none."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Toy.item2index").write_text("".join(f"{a}\t{n}\n" for n, a in enumerate(ASINS, 1)))
    (root / "Toy.text").write_text("id\ttext\n" + "".join(f"{a}\tthing {n} Brand{n % 2}\n" for n, a in enumerate(ASINS[:7], 1))
                                   + "B0UNKNOWN1\tno such item\n")
    (root / "item_meta.csv").write_text("item_id\ti_category\ti_brand\tr_complement\tr_substitute\n"
                                        + "".join(f"{n}\t{n % 3}\t{n % 2}\t[]\t[]\n" for n in range(1, 9)))
    train = ["user_id\titem_id\ttime", "1\t1\t100", "1\t2\t200", "2\t3\t100", "2\t99\t150",  # line 5: id 99 unknown
             "2\tx\t160", "3\t4\t100", "3\t5\t300", "1\t3\t300"]                            # line 6: malformed
    (root / "train.csv").write_text("\n".join(train) + "\n")
    dev = ["user_id\titem_id\ttime\tneg_items",
           f"1\t4\t{dev_time}\t[5, 4, 6, 6, 42]",  # the target, a repeat and an unknown id among the negatives
           "2\t5\t400\t[1, 2, 7]", "3\t6\t400\t[1, 2, 8]"]
    if extra_dev_line:
        dev.append(extra_dev_line)
    (root / "dev.csv").write_text("\n".join(dev) + "\n")
    test = ["user_id\titem_id\ttime\tneg_items", "1\t5\t600\t[7, 8, 1]", "2\t6\t600\t[1, 8, 8]", "3\t7\t600\t[1, 2 3]",
            "4\t1\t600\t[1]"]  # line 5: user 4's only negative is its target
    (root / "test.csv").write_text("\n".join(test) + "\n")
    return root


def test_bad_rows_are_counted_with_file_and_line(tmp_path):
    raw = write_toy_rechorus(tmp_path / "raw", extra_dev_line="1\t7\t700\t[1]")
    dataset_dir, stats = rechorus.convert(raw, "Toy", tmp_path / "data")
    bad = load_manifest(dataset_dir, "Toy")["conversion"]["bad_input"]
    assert bad["train.csv: item id outside the item2index file (row skipped)"] == {"count": 1, "first": ["train.csv:5"]}
    assert bad["train.csv: malformed row (skipped)"] == {"count": 1, "first": ["train.csv:6"]}
    assert bad["test.csv: malformed row (skipped)"] == {"count": 1, "first": ["test.csv:4"]}
    assert bad["dev.csv: second row for a user (skipped)"] == {"count": 1, "first": ["dev.csv:5"]}
    assert bad["negatives equal to the target (dropped from the set)"] == {"count": 2, "first": ["dev.csv:2", "test.csv:5"]}
    assert bad["negatives outside the item2index file (dropped from the set)"] == {"count": 1, "first": ["dev.csv:2"]}
    assert bad["items without text (kept, text mask False)"] == {"count": 1, "first": [ASINS[7]]}
    assert bad["Toy.text: ASIN not in the item2index file (ignored)"] == {"count": 1, "first": ["B0UNKNOWN1"]}
    assert bad["users without a dev or test row (RecBole's split then differs from the file's)"]["first"] == [
        "user 3", "user 4"]
    assert bad["negatives the user interacted with (kept: ReChorus never samples them)"] == {
        "count": 2, "first": ["dev.csv:2", "test.csv:2"]}  # user 1 bought items 1 and 5
    assert bad["dev/test rows without a usable negative (no candidate set written)"] == {"count": 1, "first": ["test.csv:5"]}
    assert stats["candidate_sets"] == {"sets": 5, "repeated_negatives": 2, "sets_with_repeats": 2}
    candidates = {tuple(line.split("\t")[:2]): line.split("\t")[2].split()
                  for line in (dataset_dir / "Toy.candidates").read_text().splitlines()}
    assert candidates[("1", ASINS[3])] == [ASINS[4], ASINS[5]]  # the target 4 and the unknown 42 dropped, 6 once
    assert candidates[("2", ASINS[5])] == [ASINS[0], ASINS[7]]
    assert len(candidates) == 5
    items = dict(line.split("\t", 1) for line in (dataset_dir / "Toy.item").read_text().splitlines()[1:])
    assert items[ASINS[7]] == "\tc2\t"  # no text, category 8 % 3 = 2, brand 0 = unknown


def test_times_going_backwards_inside_a_user_are_an_error(tmp_path):
    raw = write_toy_rechorus(tmp_path / "raw", dev_time=250)  # user 1's train row at 300 comes before it
    with pytest.raises(ValueError, match=r"1 interaction\(s\) earlier .*dev\.csv:2 \(user 1: 250 < 300 at train\.csv:9\)"):
        rechorus.convert(raw, "Toy", tmp_path / "data")


def test_a_broken_id_map_is_an_error_naming_the_line(tmp_path):
    raw = write_toy_rechorus(tmp_path / "raw")
    (raw / "Toy.item2index").write_text(f"{ASINS[0]}\t1\n{ASINS[1]}\t1\n")
    with pytest.raises(ValueError, match=r"Toy\.item2index:2: .* appears twice"):
        rechorus.convert(raw, "Toy", tmp_path / "data")


def test_rerun_is_a_noop_and_attribute_features(tmp_path):
    raw = write_toy_rechorus(tmp_path / "raw")
    dataset_dir, stats = rechorus.convert(raw, "Toy", tmp_path / "data")
    assert rechorus.convert(raw, "Toy", tmp_path / "data")[1] is None
    (dataset_dir / "Toy.candidates").write_text("damaged")
    assert rechorus.convert(raw, "Toy", tmp_path / "data")[1] == stats
    rechorus.write_attribute_features(dataset_dir, "Toy")
    features, mask = np.load(dataset_dir / "Toy.attribute.npy"), np.load(dataset_dir / "Toy.attribute.mask.npy")
    # item n: category n % 3 (0 = none), brand n % 2 (0 = none); columns sorted: b1, c1, c2
    expected = np.array([[n % 2 == 1, n % 3 == 1, n % 3 == 2] for n in range(1, 9)], dtype=np.float32)
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(features, np.divide(expected, norms, out=np.zeros_like(expected), where=norms > 0))
    assert mask.tolist() == [bool(n % 2 or n % 3) for n in range(1, 9)]
    assert load_manifest(dataset_dir, "Toy")["features"]["attribute"]["missing"] == 1  # item 6: category 0, brand 0


def test_amazon_and_rechorus_never_silently_share_a_folder(tmp_path):
    from tests.test_dataset_conversion import write_amazon_2018

    raw = write_toy_rechorus(tmp_path / "raw")
    dataset_dir, _ = rechorus.convert(raw, "Office", tmp_path / "data")
    write_amazon_2018(tmp_path)
    reviews, meta = tmp_path / "Office_Products_5.json.gz", tmp_path / "meta_Office_Products.json.gz"
    with pytest.raises(ValueError, match=r"converted by the 'rechorus' converter; this is the 'amazon' converter.*--force"):
        amazon.convert(reviews, meta, "Office", tmp_path / "data")
    assert load_manifest(dataset_dir, "Office")["conversion"]["parameters"]["converter"] == "rechorus"
    amazon.convert(reviews, meta, "Office", tmp_path / "data", force=True)
    assert not (dataset_dir / "Office.candidates").exists()  # nothing of the old source survives
    assert load_manifest(dataset_dir, "Office")["conversion"]["parameters"]["converter"] == "amazon"
    with pytest.raises(ValueError, match=r"converted by the 'amazon' converter; this is the 'rechorus'"):
        rechorus.convert(raw, "Office", tmp_path / "data")


def test_office_yaml_declares_what_the_converter_writes():
    import yaml

    office = yaml.safe_load((Path(__file__).resolve().parent.parent / "properties/dataset/Office.yaml").read_text())
    assert office["TIME_FIELD"] == "timestamp" and office["load_col"]["inter"] == ["user_id", "item_id", "timestamp"]
    assert office["modalities"] == ["text", "attribute"]
    assert {office["feature_tables"][m]["path"] for m in office["modalities"]} == {"Office.text.npy", "Office.attribute.npy"}


def test_command_line(tmp_path):
    import subprocess
    import sys

    raw = write_toy_rechorus(tmp_path / "raw")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "dataset_conversion/rechorus.py", "--raw_dir", str(raw), "--dataset", "Toy",
                           "--output_dir", str(tmp_path / "data"), "--no_encode"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Toy: 4 users, 8 items, 12 interactions, 5 candidate sets" in done.stderr
    assert "train.csv: malformed row (skipped): 1 (first: train.csv:6)" in done.stderr
