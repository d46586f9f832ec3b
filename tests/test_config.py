"""Config layering: RecBole defaults < overall.yaml < dataset yaml < model yaml < files < dict < cmd."""
import pytest

from recbole_mm.config import PROPERTIES_DIR, Config
from recbole_mm.utils import RecboleMMError, get_model


def read_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_each_layer_overrides_the_one_below(scientific_dir, tmp_path):
    overall = read_yaml(PROPERTIES_DIR / "overall.yaml")
    dataset_yaml = read_yaml(PROPERTIES_DIR / "dataset" / "Scientific.yaml")
    model_yaml = read_yaml(PROPERTIES_DIR / "model" / "MMSASRec.yaml")

    config = Config("MMSASRec", "Scientific")
    assert config["valid_metric"] == overall["valid_metric"]  # overall.yaml over RecBole's MRR@10
    assert config["MAX_ITEM_LIST_LENGTH"] == dataset_yaml["MAX_ITEM_LIST_LENGTH"]
    assert config["hidden_size"] == model_yaml["hidden_size"]
    assert config["feature_dropout_prob"] == model_yaml["feature_dropout_prob"]
    assert config["modalities"] == dataset_yaml["modalities"] == ["text", "image"]
    assert config["data_path"].endswith("Scientific")

    user_file = tmp_path / "user.yaml"
    user_file.write_text("hidden_size: 24\nlearning_rate: 0.005\nn_layers: 3\n")
    config = Config("MMSASRec", "Scientific", config_file_list=[str(user_file)],
                    config_dict={"learning_rate": 0.002, "n_layers": 4}, cmd_args=["--n_layers=5"])
    assert config["hidden_size"] == 24            # file over model yaml
    assert config["learning_rate"] == 0.002       # dict over file
    assert config["n_layers"] == 5                # command line over dict


def test_model_yaml_overrides_dataset_yaml(scientific_dir, tmp_path, monkeypatch):
    """The dataset yaml sets MAX_ITEM_LIST_LENGTH; a model yaml setting it too wins."""
    import recbole_mm.config.configurator as config_module

    properties = tmp_path / "properties"
    (properties / "dataset").mkdir(parents=True)
    (properties / "model").mkdir()
    (properties / "overall.yaml").write_text(
        (PROPERTIES_DIR / "overall.yaml").read_text().replace("valid_metric: NDCG@10", "valid_metric: Recall@10")
        + "MAX_ITEM_LIST_LENGTH: 7\n")
    (properties / "dataset" / "Scientific.yaml").write_text(
        (PROPERTIES_DIR / "dataset" / "Scientific.yaml").read_text().replace("MAX_ITEM_LIST_LENGTH: 50", "MAX_ITEM_LIST_LENGTH: 11"))
    (properties / "model" / "MMSASRec.yaml").write_text(
        (PROPERTIES_DIR / "model" / "MMSASRec.yaml").read_text() + "MAX_ITEM_LIST_LENGTH: 13\n")
    monkeypatch.setattr(config_module, "PROPERTIES_DIR", properties)
    assert Config("MMSASRec", "Scientific")["MAX_ITEM_LIST_LENGTH"] == 13
    (properties / "model" / "MMSASRec.yaml").write_text((PROPERTIES_DIR / "model" / "MMSASRec.yaml").read_text())
    assert Config("MMSASRec", "Scientific")["MAX_ITEM_LIST_LENGTH"] == 11
    assert Config("MMSASRec", "Scientific")["valid_metric"] == "Recall@10"


def test_sys_argv_is_not_read(monkeypatch, scientific_dir):
    monkeypatch.setattr("sys.argv", ["pytest", "--hidden_size=999"])
    assert Config("MMSASRec", "Scientific")["hidden_size"] != 999


def test_command_line_lists_of_bare_words():
    config = Config("MMSASRec", "Scientific", cmd_args=["--modalities=[text]", "--topk=[5,10]",
                                                         "--eval_args={mode: full}"])
    assert config["modalities"] == ["text"]
    assert config["topk"] == [5, 10]


def test_malformed_command_line_argument():
    with pytest.raises(RecboleMMError, match="--key=value"):
        Config("MMSASRec", "Scientific", cmd_args=["hidden_size=3"])


def test_data_path_override(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_MM_DATA", str(tmp_path))
    assert Config("SASRec", "Scientific")["data_path"] == str(tmp_path / "Scientific")
    monkeypatch.delenv("RECBOLE_MM_DATA")
    assert Config("SASRec", "Scientific", config_dict={"data_path": "/x/y"})["data_path"] == "/x/y/Scientific"


def test_lookup_prefers_recbole_mm_then_recbole():
    assert get_model("MMSASRec").__module__ == "recbole_mm.model.mmsasrec"
    assert get_model("SASRec").__module__ == "recbole.model.sequential_recommender.sasrec"
    assert get_model("GRU4Rec").__module__.startswith("recbole.")
    with pytest.raises(RecboleMMError) as error:
        get_model("SASrec")
    assert "MMSASRec" in str(error.value) and "SASRec" in str(error.value) and "BERT4Rec" in str(error.value)
