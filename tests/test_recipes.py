"""The authors' recipes (properties/recipes/) and the trainer options they need."""
import pytest
import torch
import yaml

from recbole_mm.config import PROPERTIES_DIR, Config
from recbole_mm.quick_start import build
from recbole_mm.utils import RecboleMMError
from tests.conftest import scientific_slice_config, write_scientific_slice


@pytest.fixture(scope="module")
def slice_root(scientific_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    write_scientific_slice(scientific_dir, root, n_users=60)
    return root


def test_fmrlrec_recipe_builds_the_authors_optimizer(slice_root, in_tmp_cwd):
    recipe = yaml.safe_load((PROPERTIES_DIR / "recipes" / "FMRLRec-authors.yaml").read_text())
    config_dict = scientific_slice_config(slice_root, recipe="authors", hidden_size=32)
    config, (train_data, _, _), model, trainer = build("FMRLRec", "SciSlice", config_dict=config_dict)
    for key, value in recipe.items():
        assert config[key] == config_dict.get(key, value), key  # the recipe, below the user's own settings
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert decayed["eps"] == exempt["eps"] == 1e-9 and decayed["lr"] == 1e-4
    names = {id(p): n for n, p in model.named_parameters()}
    expected_exempt = {n for n, p in model.named_parameters() if p.requires_grad and ("bias" in n or "_norm" in n)}
    assert {names[id(p)] for p in exempt["params"]} == expected_exempt
    assert any("lru_norm" in n for n in expected_exempt) and any(n.endswith(".bias") for n in expected_exempt)
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad} - expected_exempt


def test_a_user_setting_beats_the_recipe_and_unknown_recipes_are_named(slice_root, in_tmp_cwd):
    config = Config("FMRLRec", "SciSlice", config_dict=scientific_slice_config(slice_root, recipe="authors"),
                    cmd_args=["--learning_rate=0.002"])
    assert config["learning_rate"] == 0.002 and config["warmup_steps"] == 100 and config["learner"] == "adamw"
    with pytest.raises(RecboleMMError, match="no recipe 'paper' for FMRLRec.*recipes: authors"):
        Config("FMRLRec", "SciSlice", config_dict=scientific_slice_config(slice_root, recipe="paper"))


def accumulated_gradient(slice_root, mode):
    """The gradient at the optimizer's first step after two accumulated micro-batches."""
    config_dict = scientific_slice_config(
        slice_root, learner="sgd", gradient_accumulation_steps=2, gradient_accumulation_loss=mode, shuffle=False,
        hidden_dropout_prob=0.0, attn_dropout_prob=0.0, feature_dropout_prob=0.0, train_batch_size=64)
    config, (train_data, _, _), model, trainer = build("MMSASRec", "SciSlice", config_dict=config_dict)
    batches = list(train_data)[:2]
    seen = []

    def capture_and_stop():
        seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        raise StopIteration

    trainer.optimizer.step = capture_and_stop
    with pytest.raises(StopIteration):
        trainer._train_epoch(train_data, 0)
    # written out: each micro-batch's loss gradient, computed separately
    model.zero_grad()
    separate = []
    for batch in batches:
        model.zero_grad()
        model.calculate_loss(batch).backward()
        separate.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return seen[0], separate


@pytest.mark.parametrize("mode,factor", [("sum", 1.0), ("mean", 0.5)])
def test_gradient_accumulation_sums_or_averages_the_micro_batches(slice_root, in_tmp_cwd, mode, factor):
    accumulated, separate = accumulated_gradient(slice_root, mode)
    assert accumulated.keys() == separate[0].keys()
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad, factor * (separate[0][name] + separate[1][name]), rtol=1e-5, atol=1e-7)


def test_unknown_accumulation_mode_and_sgd_eps_are_refused(slice_root, in_tmp_cwd):
    with pytest.raises(RecboleMMError, match="gradient_accumulation_loss: 'avg'"):
        build("MMSASRec", "SciSlice", config_dict=scientific_slice_config(slice_root, gradient_accumulation_loss="avg"))
    with pytest.raises(RecboleMMError, match="SGD has no epsilon"):
        build("MMSASRec", "SciSlice", config_dict=scientific_slice_config(slice_root, learner="sgd", optimizer_eps=1e-9))
