"""recbole-mm's defaults suit sequential CE models; RecBole's other model types (pairwise, pointwise,
general, graph, traditional, context-aware) must still run unchanged: one epoch each on a tiny slice."""
import pytest

from recbole_mm.config import Config
from recbole_mm.quick_start import run
from tests.conftest import scientific_slice_config, write_scientific_slice, write_timestamped_dataset

SLICE_MODELS = ["BPR", "NeuMF", "LightGCN", "Pop", "ItemKNN", "SASRec", "GRU4Rec"]
# context-aware models read every column as a feature: a normal-mode dataset (user, item, time)
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
