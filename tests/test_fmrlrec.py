"""FMRLRec: nesting property, extraction, recurrent mode, padding, loss, ablations, CLI run."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recbole.data.interaction import Interaction
from torch.nn import functional as F

from recbole_mm.model.fmrlrec import FMRLRec, extract_submodel, resolve_mrl_sizes

PROJECT = Path(__file__).resolve().parent.parent
N_ITEMS = 30
FEATURE_DIMS = {"text": 12, "image": 10}


class TinyDataset:
    """What FMRLRec reads from a dataset: item count and the feature hook's tables."""

    has_timestamps = False

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.item_features = {name: torch.randn(N_ITEMS, dim, generator=g) for name, dim in FEATURE_DIMS.items()}
        for table in self.item_features.values():
            table[0] = 0.0
        self.item_feature_masks = {name: torch.arange(N_ITEMS) > 0 for name in FEATURE_DIMS}

    def num(self, field):
        return N_ITEMS


def tiny_config(**overrides):
    config = yaml.safe_load((PROJECT / "properties" / "model" / "FMRLRec.yaml").read_text())
    config.update(
        USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list",
        ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_", MAX_ITEM_LIST_LENGTH=12, device="cpu",
        hidden_size=32, mrl_sizes=None, n_layers=2, ffn_expansion=2, lru_r_min=0.5, lru_r_max=0.9,
        modalities=list(FEATURE_DIMS),  # what a dataset yaml declaring both tables gives
    )
    config.update(overrides)
    return config


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config, dataset = tiny_config(**overrides), TinyDataset()
    return FMRLRec(config, dataset).eval(), config, dataset


def random_batch(batch=5, max_len=12, seed=1):
    """Right-padded sequences, as RecBole builds them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len
    items = torch.randint(1, N_ITEMS, (batch, max_len), generator=g)
    items[torch.arange(max_len) >= lengths[:, None]] = 0
    target = torch.randint(1, N_ITEMS, (batch,), generator=g)
    return Interaction({"item_id_list": items, "item_length": lengths, "item_id": target})


def test_default_sizes_are_powers_of_two_up_to_hidden_size():
    assert resolve_mrl_sizes(None, 256) == [8, 16, 32, 64, 128, 256]
    assert resolve_mrl_sizes(None, 48) == [8, 16, 32, 48]


@pytest.mark.parametrize("modalities", [["text", "image"], []])
@pytest.mark.parametrize("size", [8, 16])
def test_first_dims_of_every_hidden_state_equal_extracted_model(modalities, size):
    model, config, dataset = make_model(modalities=modalities)
    model.double()
    small = extract_submodel(model, config, dataset, size).double().eval()
    assert small.hidden_size == size and small.mrl_sizes == [s for s in model.mrl_sizes if s <= size]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    items = random_batch()["item_id_list"]
    full_hidden, full_states = model.encode(items)
    small_hidden, small_states = small.encode(items)
    assert len(full_hidden) == len(small_hidden) == config["n_layers"] + 1
    for full, extracted in zip(full_hidden + full_states, small_hidden + small_states):
        assert extracted.shape[-1] == size
        torch.testing.assert_close(full[..., :size], extracted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("modalities", [["text", "image"], ["text"], ["image"], []])
def test_extracted_scores_equal_sliced_scores(modalities):
    model, config, dataset = make_model(modalities=modalities)
    batch = random_batch()
    with torch.no_grad():
        per_size = model.full_sort_predict_per_size(batch)
        for index, size in enumerate(model.mrl_sizes):
            small = extract_submodel(model, config, dataset, size).eval()
            torch.testing.assert_close(small.full_sort_predict(batch), per_size[index], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.full_sort_predict(batch), per_size[-1], rtol=0, atol=1e-5)


def test_loss_is_mean_of_standalone_models_cross_entropies():
    model, config, dataset = make_model()
    batch = random_batch()
    with torch.no_grad():
        expected = torch.stack([
            F.cross_entropy(extract_submodel(model, config, dataset, size).eval().full_sort_predict(batch), batch["item_id"])
            for size in model.mrl_sizes
        ]).mean()
        torch.testing.assert_close(model.calculate_loss(batch), expected, rtol=1e-5, atol=1e-5)


def test_predict_matches_full_sort_scores():
    model, _, _ = make_model()
    batch = random_batch()
    with torch.no_grad():
        expected = model.full_sort_predict(batch).gather(1, batch["item_id"][:, None]).squeeze(1)
        torch.testing.assert_close(model.predict(batch), expected, rtol=1e-5, atol=1e-5)


def test_step_mode_equals_parallel_encoding_on_every_prefix():
    model, _, _ = make_model()
    model.double()
    items = random_batch(batch=3, seed=2)["item_id_list"][:, :10]
    items[items == 0] = 1  # full-length histories, so every prefix is a real history
    table = model.item_table()
    states = None
    for t in range(items.shape[1]):
        stepped, states = model.step(items[:, t], states, table)
        prefix_len = torch.full((items.shape[0],), t + 1)
        encoded = model.forward(items[:, : t + 1], prefix_len, table)
        torch.testing.assert_close(stepped, encoded, rtol=1e-10, atol=1e-10)
    # continuing from a parallel-encoded history gives the same result as stepping from scratch
    history, states = model.encode_history(items[:, :6], torch.full((3,), 6), table)
    for t in range(6, 10):
        history, states = model.step(items[:, t], states, table)
    torch.testing.assert_close(history, stepped, rtol=1e-10, atol=1e-10)


def test_right_padding_never_changes_real_positions():
    model, _, _ = make_model()
    batch = random_batch()
    items, lengths = batch["item_id_list"], batch["item_length"]
    with torch.no_grad():
        reference = model.forward(items, lengths)
        longer = torch.cat([items, torch.zeros(items.shape[0], 9, dtype=items.dtype)], dim=1)
        torch.testing.assert_close(model.forward(longer, lengths), reference, rtol=0, atol=1e-6)
        # whatever sits in the padding slots, real positions do not see it
        garbage = items.clone()
        pad = torch.arange(items.shape[1]) >= lengths[:, None]
        garbage[pad] = torch.randint(1, N_ITEMS, (int(pad.sum()),))
        torch.testing.assert_close(model.forward(garbage, lengths), reference, rtol=0, atol=1e-6)


def test_small_loss_gradient_never_reaches_larger_chunks():
    model, _, _ = make_model(mrl_sizes=[8, 32])
    model.train()
    batch = random_batch()
    table = model.item_table()
    seq = model.forward(batch["item_id_list"], batch["item_length"], table)
    F.cross_entropy(model.scores_per_size(seq, table)[0], batch["item_id"]).backward()
    for name, parameter in model.named_parameters():
        if ".chunks.1." in name:
            assert parameter.grad is None or parameter.grad.abs().max() == 0, name


def test_bad_config_is_rejected():
    with pytest.raises(Exception, match="mrl_sizes"):
        make_model(mrl_sizes=[8, 16])
    with pytest.raises(Exception, match="loss_type"):
        make_model(loss_type="BPR")
    model, config, dataset = make_model()
    with pytest.raises(Exception, match="not one of the trained sizes"):
        extract_submodel(model, config, dataset, 12)


def run_cli(*args, cwd):
    completed = subprocess.run(
        [sys.executable, str(PROJECT / "run_recbole_mm.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    test_line = next(line for line in completed.stdout.splitlines() if line.startswith("[recbole-mm]"))
    return ast.literal_eval(test_line.split(" test=", 1)[1].split(" checkpoint=", 1)[0])


def test_one_epoch_cli_run_extract_and_evaluate(scientific_dir, in_tmp_cwd):
    """run_recbole_mm.py trains 1 epoch on Scientific; the extracted size-8 checkpoint holds the
    full model's leading corners and the CLI runs it on its own with the per-size metrics of size 8
    (a text-only run, so the extracted settings must carry the modalities too)."""
    data = f"--data_path={scientific_dir.parent}"
    checkpoint_dir = in_tmp_cwd / "saved"
    run_cli("--model=FMRLRec", "--dataset=Scientific", data, f"--checkpoint_dir={checkpoint_dir}", "--epochs=1",
            "--hidden_size=16", "--modalities=['text']", "--show_progress=False", "--train_batch_size=512",
            cwd=in_tmp_cwd)
    (checkpoint,) = checkpoint_dir.glob("FMRLRec-*.pth")

    from recbole_mm.tools.fmrlrec import evaluate_sizes, load_run, save_submodel

    config, (train_data, _, test_data), model, _ = load_run(str(checkpoint), [data])
    per_size = evaluate_sizes(model, test_data, config)
    assert [len(r) for r in per_size] == [4, 4]  # sizes 8, 16 x Recall/NDCG @10/@20

    small_path = in_tmp_cwd / "FMRLRec-8.pth"
    save_submodel(str(checkpoint), 8, str(small_path), [data])
    saved_state = torch.load(small_path, weights_only=True)["state_dict"]
    expected_state = extract_submodel(model, config, train_data.dataset, 8).state_dict()
    assert saved_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(saved_state[name], tensor), name
    small_settings = yaml.safe_load(small_path.with_suffix(".yaml").read_text())
    assert small_settings["hidden_size"] == 8 and small_settings["modalities"] == ["text"]

    small_test = run_cli("--model=FMRLRec", "--dataset=Scientific", data, f"--config_files={small_path.with_suffix('.yaml')}",
                         f"--resume={small_path}", "--epochs=0", "--show_progress=False", cwd=in_tmp_cwd)
    assert small_test == per_size[0]


def test_parameter_accounting_matches_closed_form_counts():
    from recbole_mm.tools.fmrlrec import parameter_accounting

    config = tiny_config(hidden_size=32, mrl_sizes=[8, 16, 32], n_layers=2, ffn_expansion=1)
    rows = parameter_accounting(config, TinyDataset())
    # per block: 7 square fMRL weights (LRU B_re, B_im, C_re, C_im; FFN gate, in, out), 6 biases (C_im has none)
    dense = {s: 2 * (7 * s * s + 6 * s) for s in (8, 16, 32)}
    chunked = {8: 8 * 8, 16: 8 * 8 + 16 * 8, 32: 8 * 8 + 16 * 8 + 32 * 16}
    for row in rows:
        s = row["size"]
        assert row["independent_fmrl_layers"] == dense[s]
        assert row["extracted_fmrl_layers"] == 2 * (7 * chunked[s] + 6 * s)
    assert rows[-1]["independent_family_fmrl_layers"] == sum(dense.values())
