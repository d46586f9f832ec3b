"""recbole-mm's defaults suit sequential CE models; RecBole's other model types (pairwise, pointwise,
general, graph, traditional, context-aware) must still run unchanged: one epoch each on a tiny slice."""
import pytest

from recbole_mm.config import Config
from recbole_mm.quick_start import run
from recbole_mm.utils import RecboleMMError
from tests.conftest import scientific_slice_config, write_scientific_slice, write_timestamped_dataset

SLICE_MODELS = ["BPR", "NeuMF", "LightGCN", "Pop", "ItemKNN", "SASRec", "GRU4Rec"]
# context-aware models: on a normal-mode dataset (user, item, time) here, on the benchmark layout below
CONTEXT_MODELS = ["FM", "DeepFM"]


@pytest.fixture(scope="module")
def data_root(scientific_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    write_scientific_slice(scientific_dir, root / "data", n_users=60)
    write_timestamped_dataset(root / "data")
    return root


def check(result):
    assert set(result["test_result"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert all(0.0 <= value <= 1.0 for value in result["test_result"].values())


@pytest.mark.parametrize("model", SLICE_MODELS)
def test_model_type_runs_one_epoch(model, data_root, monkeypatch):
    monkeypatch.chdir(data_root)
    config = scientific_slice_config(data_root / "data", embedding_size=8, extra_config_keys=["hidden_size", "inner_size"])
    check(run(model, "SciSlice", config_dict=config))


@pytest.mark.parametrize("model", CONTEXT_MODELS)
def test_context_aware_model_runs_one_epoch(model, data_root, monkeypatch):
    monkeypatch.chdir(data_root)
    config = {"data_path": str(data_root / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
              "epochs": 1, "embedding_size": 8, "show_progress": False, "train_batch_size": 64}
    check(run(model, "TimeToy", config_dict=config))


def benchmark_item_tokens(dataset_dir, name):
    """Every item token of a benchmark-format dataset: targets and history items of the three files."""
    tokens = set()
    for split in ("train", "valid", "test"):
        for line in (dataset_dir / f"{name}.{split}.inter").read_text().splitlines()[1:]:
            _, history, target = line.split("\t")
            tokens |= set(history.split()) | {target}
    return tokens


@pytest.mark.parametrize("model", CONTEXT_MODELS)
def test_context_aware_model_runs_on_a_benchmark_dataset(model, data_root, monkeypatch):
    """Scientific's layout (pre-split files, an item_id_list history column): the history still numbers
    the items (the catalogue every other model ranks, history-only items included) but is no feature."""
    monkeypatch.chdir(data_root)
    config = scientific_slice_config(data_root / "data", embedding_size=8, modalities=[], feature_tables={},
                                     extra_config_keys=["hidden_size", "inner_size"])
    seen = {}
    result = run(model, "SciSlice", config_dict=config,
                 on_built=lambda config, model, trainer, dataset: seen.update(model=model, dataset=dataset))
    check(result)
    expected_items = benchmark_item_tokens(data_root / "data" / "SciSlice", "SciSlice")
    assert seen["dataset"].item_num == len(expected_items) + 1  # + RecBole's padding item 0
    assert "item_id_list" not in seen["dataset"].field2type
    assert seen["model"].token_seq_field_names == []


def test_context_model_reading_a_per_interaction_column_is_refused_at_start_up(data_root, tmp_path, monkeypatch):
    """A token column of the interaction file cannot be supplied by full ranking: refused before training,
    naming the column and the fix; the fix it names (unused_col) runs."""
    source = data_root / "data" / "TimeToy" / "TimeToy.inter"
    target = tmp_path / "data" / "CtxToy"
    target.mkdir(parents=True)
    lines = source.read_text().splitlines()
    rows = [lines[0] + "\tdevice:token"] + [f"{line}\t{'phone' if n % 2 else 'desktop'}" for n, line in enumerate(lines[1:])]
    (target / "CtxToy.inter").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    config = {"data_path": str(tmp_path / "data"), "epochs": 1, "embedding_size": 8, "show_progress": False,
              "train_batch_size": 64, "load_col": {"inter": ["user_id", "item_id", "timestamp", "device"]}}
    started = []
    with pytest.raises(RecboleMMError, match=r"CtxToy.*column\(s\) device.*unused_col: \{inter: \[device\]\}"):
        run("FM", "CtxToy", config_dict=config, on_built=lambda *args: started.append(True))
    assert not started
    check(run("FM", "CtxToy", config_dict={**config, "unused_col": {"inter": ["device"]}}))


@pytest.mark.parametrize("model, sampled", [("BPR", True), ("NeuMF", True), ("FM", True), ("SASRec", False),
                                            ("MMSASRec", False)])
def test_negative_sampling_only_where_it_belongs(model, sampled):
    """CE sequential models: none (full softmax); pairwise/pointwise/context-aware: RecBole's one
    uniform negative per positive; a user's own setting always wins."""
    config = Config(model, "Scientific")
    assert (config["train_neg_sample_args"]["distribution"] != "none") == sampled
    config = Config("SASRec", "Scientific", config_dict={"loss_type": "BPR"})
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    config = Config("BPR", "Scientific", config_dict={"train_neg_sample_args": {"distribution": "popularity",
                                                                               "sample_num": 2}})
    assert config["train_neg_sample_args"]["sample_num"] == 2
