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


# ------------------------------------------------------------------------------------------------
# Validation: unknown keys and values of the wrong type are errors, before anything runs
# ------------------------------------------------------------------------------------------------
def config_error(model="MMSASRec", **kwargs):
    with pytest.raises(RecboleMMError) as error:
        Config(model, "Scientific", **kwargs)
    return str(error.value)


def test_misspelt_key_on_the_command_line_names_it_and_the_fix():
    message = config_error(cmd_args=["--hiden_size=128"])
    assert "--hiden_size on the command line" in message and "did you mean hidden_size" in message
    assert "extra_config_keys" in message


def test_misspelt_key_in_a_config_file_and_in_config_dict(tmp_path):
    user_file = tmp_path / "mine.yaml"
    user_file.write_text("learning_rate: 0.01\nlearnig_rate: 0.01\n")
    message = config_error(config_file_list=[str(user_file)])
    assert f"learnig_rate in config file {user_file}" in message and "did you mean learning_rate" in message
    message = config_error(config_dict={"n_layer": 2})
    assert "n_layer in config_dict" in message and "n_layers" in message


def test_keys_known_from_every_source_are_accepted():
    Config("MMSASRec", "Scientific", cmd_args=[
        "--hidden_size=16",            # the model's yaml
        "--feature_tables={}",         # recbole-mm's overall.yaml
        "--lr_scheduler=warmup_cosine",
        "--stopping_step=3",           # RecBole's overall.yaml
        "--nproc=1",                   # RecBole reads it in code (DDP), no yaml default
        "--resume=~",                  # recbole-mm reads it in code
        "--alias_of_item_id=[item_id_list]",  # a dataset key
    ])
    Config("BPR", "Scientific", cmd_args=["--embedding_size=8"])  # RecBole's BPR.yaml
    # another model's key (a config file shared by several models): accepted, and named in a warning
    assert Config("BPR", "Scientific", cmd_args=["--hidden_size=8"]).keys_for_other_models() == ["hidden_size"]
    assert Config("SASRec", "Scientific", cmd_args=["--hidden_size=8"]).keys_for_other_models() == []


def test_a_model_declares_keys_it_reads():
    from recbole_mm.model.mmsasrec import MMSASRec

    class WithOwnKey(MMSASRec):
        CONFIG_KEYS = ("my_temperature",)

    # a subclass has no yaml of its own: loss_type (MMSASRec.yaml's) is given here
    assert Config(WithOwnKey, "Scientific", config_dict={"my_temperature": 2.0, "loss_type": "CE"})["my_temperature"] == 2.0
    assert "my_temperature" in config_error(config_dict={"my_temperature": 2.0})


def test_extra_config_keys_lets_deliberate_keys_through(tmp_path):
    config = Config("MMSASRec", "Scientific", config_dict={"extra_config_keys": ["note"], "note": "run A"})
    assert config["note"] == "run A"
    config = Config("MMSASRec", "Scientific", cmd_args=["--extra_config_keys=[note,tag]", "--note=x", "--tag=3"])
    assert config["note"] == "x" and config["tag"] == 3
    assert "tag" in config_error(cmd_args=["--extra_config_keys=[note]", "--note=x", "--tag=3"])


@pytest.mark.parametrize("argument, expected", [
    ("--learning_rate=abc", "learning_rate takes a number"),
    ("--epochs=1.5", "epochs takes an integer"),
    ("--reproducibility=maybe", "reproducibility takes a boolean"),
    ("--modalities=text", "modalities takes a list"),
    ("--eval_args=[1,2]", "eval_args takes a mapping"),
    ("--valid_metric=5", "valid_metric takes a string"),
    ("--stopping_step=True", "stopping_step takes an integer"),
])
def test_value_of_the_wrong_type_names_key_value_and_type(argument, expected):
    message = config_error(cmd_args=[argument])
    key, value = argument[2:].split("=")
    assert f"--{key} on the command line is" in message and expected in message and "default" in message


def test_values_of_the_right_type_pass():
    config = Config("MMSASRec", "Scientific", cmd_args=[
        "--learning_rate=1",             # an integer where a number is expected
        "--hidden_dropout_prob=0",
        "--clip_grad_norm={max_norm: 5}",  # null default: anything
        "--lr_scheduler=~",              # null value: always accepted
        "--topk=10", "--metrics=Recall",  # shapes RecBole itself accepts
        "--gpu_id=0",
    ])
    assert config["learning_rate"] == 1 and config["clip_grad_norm"] == {"max_norm": 5}


def test_type_errors_in_files_name_the_file(tmp_path):
    user_file = tmp_path / "mine.yaml"
    user_file.write_text("train_batch_size: '256'\n")
    message = config_error(config_file_list=[str(user_file)])
    assert f"train_batch_size in config file {user_file} is '256'" in message and "an integer" in message


def test_broken_config_files_are_clean_errors(tmp_path):
    assert "not found" in config_error(config_file_list=[str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    assert "not valid YAML" in config_error(config_file_list=[str(broken)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "key: value" in config_error(config_file_list=[str(listing)])


def test_flush_denormal_flushes_cpu_denormals_by_default_and_is_not_part_of_a_cell_hash():
    import torch

    from recbole_mm.experiments.hashing import config_hash
    from recbole_mm.compat import plain_config

    tiny = torch.tensor([1e-30])
    try:
        Config("SASRec", "ml-100k-mm", config_dict={"flush_denormal": False})
        assert (tiny * 1e-10).item() == pytest.approx(1e-40, rel=1e-2, abs=0)  # a denormal result is kept
        default = Config("SASRec", "ml-100k-mm")
        assert default["flush_denormal"] is True
        assert (tiny * 1e-10).item() == 0.0  # flushed to zero
        assert (tiny * 2e-8).item() == pytest.approx(2e-38, rel=1e-6, abs=0)  # normal numbers (>= 1.18e-38) are kept
        off = Config("SASRec", "ml-100k-mm", config_dict={"flush_denormal": False})
        assert config_hash(plain_config(default)) == config_hash(plain_config(off))
    finally:
        torch.set_flush_denormal(True)
