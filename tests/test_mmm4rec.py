"""MMM4Rec: leak-free time path, Fourier filter, weight sharing, in-batch loss, transfer, CLI runs."""
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from recbole.data.interaction import Interaction

from tests.conftest import scientific_slice_config, write_scientific_slice, write_timestamped_dataset
from recbole_mm.model.layers import ssd as ssd_module
from recbole_mm.model.layers.ssd import CausalDepthwiseConv1d, segment_sum
from recbole_mm.model.mmm4rec import DualChannelFourierFilter, TiSSD, masked_sequence_layer_norm
from recbole_mm.quick_start import build
from recbole_mm.quick_start.transfer import load_pretrained, parse_dataset_list
from run_recbole_mm import main as cli_main

TINY = dict(modalities=["text", "image"], hidden_size=16, inner_size=32, d_state=8, head_dim=8, n_groups=2, chunk_size=4,
            show_progress=False, epochs=1, train_batch_size=64, eval_batch_size=64)


def timestamped_config(root, **overrides):
    return {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "TIME_FIELD": "timestamp",
        "feature_tables": {"text": {"path": "TimeToy.text.npy"}, "image": {"path": "TimeToy.image.npy"}},
        "modalities": ["text", "image"],
        "MAX_ITEM_LIST_LENGTH": 10,
        **TINY,
        **overrides,
    }


@pytest.fixture
def time_model(in_tmp_cwd):
    write_timestamped_dataset(in_tmp_cwd / "data")

    def make(perturb=True, **overrides):
        config, loaders, model, _ = build("MMM4Rec", "TimeToy", config_dict=timestamped_config(in_tmp_cwd / "data", **overrides))
        if perturb:  # at N(0, 0.02) init the time path barely moves outputs; invariances must hold for any weights
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=gen))
        return config, loaders, model.eval()

    return make


# ------------------------------------------------------------------ building blocks
def test_masked_sequence_layer_norm_is_layer_norm_over_real_positions_only():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 2, 6, generator=gen) * 1e4
    lengths = [6, 3, 1]
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).float()[:, None, :]
    norm = torch.nn.LayerNorm(6, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    got = masked_sequence_layer_norm(values, mask, norm)
    for row, n in enumerate(lengths):
        expected = F.layer_norm(values[row, :, :n], (n,), norm.weight[:n], norm.bias[:n], eps=1e-12)
        torch.testing.assert_close(got[row, :, :n], expected, rtol=1e-5, atol=1e-5)
        assert torch.all(got[row, :, n:] == 0)


def dense_real_fourier_filter(module, query, key):
    """eqs. 12-15 with explicit DFT sums (numpy, float64) instead of torch.fft."""
    length = query.shape[-1]
    bins = length // 2 + 1
    k, n = np.arange(bins)[:, None], np.arange(length)[None, :]
    forward = np.exp(-2j * np.pi * k * n / length) / math.sqrt(length)  # (bins, L): rfft, norm='ortho'

    def complex_linear(layer, spectrum):
        w_r, b_r = layer.real.weight.detach().double().numpy(), layer.real.bias.detach().double().numpy()
        w_i, b_i = layer.imag.weight.detach().double().numpy(), layer.imag.bias.detach().double().numpy()
        re, im = spectrum.real, spectrum.imag
        return (re @ w_r.T + b_r - (im @ w_i.T + b_i)) + 1j * (re @ w_i.T + b_i + im @ w_r.T + b_r)

    q_spec = query.double().numpy() @ forward.T
    k_spec = key.double().numpy() @ forward.T
    fused = q_spec * complex_linear(module.query_filter, q_spec) + k_spec * complex_linear(module.key_filter, k_spec)
    fused = complex_linear(module.fusion_filter, fused)
    # Inverse real DFT of a half spectrum: imaginary parts of the DC and Nyquist bins do not exist.
    weights = np.full(bins, 2.0)
    weights[0] = 1.0
    if length % 2 == 0:
        weights[-1] = 1.0
    fused = fused.copy()
    fused[..., 0] = fused[..., 0].real
    if length % 2 == 0:
        fused[..., -1] = fused[..., -1].real
    inverse = (weights[:, None] * np.exp(2j * np.pi * k * n / length)).real, (weights[:, None] * np.exp(2j * np.pi * k * n / length)).imag
    return (fused.real @ inverse[0] - fused.imag @ inverse[1]) / math.sqrt(length)


@pytest.mark.parametrize("length", [7, 20])
def test_fourier_filter_shapes_real_output_and_dense_dft_definition(length):
    torch.manual_seed(length)
    module = DualChannelFourierFilter(length)
    for layer in (module.query_filter, module.key_filter, module.fusion_filter):
        for linear in (layer.real, layer.imag):
            torch.nn.init.normal_(linear.bias, std=0.3)
    query, key = torch.randn(3, 4, length), torch.randn(3, 4, length)
    ones = torch.ones(3, 1, length)
    out = module(query, key, ones)
    assert out.shape == (3, 4, length) and out.dtype == torch.float32 and not out.is_complex()
    np.testing.assert_allclose(out.detach().numpy(), dense_real_fourier_filter(module, query, key), rtol=1e-4, atol=1e-4)
    mask = (torch.arange(length) < length - 3).float().expand(3, 1, length)
    assert torch.all(module(query * mask, key * mask, mask)[..., length - 3:] == 0)


# ------------------------------------------------------------------ the fast CPU paths compute what the reference paths do
def ssd_quadratic_before_speedup(x, delta, A, B, C, D=None):
    """ssd_quadratic as it was before the CPU speed work (einsum over repeated groups, skip added after)."""
    heads = x.shape[2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, deltaf = x.to(dtype), delta.to(dtype)
    Bh = B.to(dtype).repeat_interleave(heads // B.shape[2], dim=2)
    Ch = C.to(dtype).repeat_interleave(heads // C.shape[2], dim=2)
    decay_mask = torch.exp(segment_sum((deltaf * A.to(dtype)).transpose(1, 2)))
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * decay_mask
    y = torch.einsum("bhts,bshp->bthp", scores, xf * deltaf[..., None])
    if D is not None:
        y = y + D.to(dtype)[:, None] * deltaf[..., None] * xf
    return y.to(x.dtype)


@pytest.mark.parametrize("n_groups", [1, 4])
def test_training_step_outputs_and_gradients_equal_the_reference_paths(time_model, monkeypatch, n_groups):
    """Train mode (dropout on, same seed), time path on: loss, scores and every gradient of the fast
    paths (shifted conv, grouped quadratic SSD) equal the pre-speed-up implementation (F.conv1d,
    einsum SSD) in float64."""
    _, (train_data, _, _), model = time_model(n_groups=n_groups, hidden_size=16, head_dim=4)
    assert model.is_time and model.n_heads == 8
    model = model.double().train()
    interaction = next(iter(train_data)).to(model.device)
    interaction.interaction = {k: v.double() if v.is_floating_point() else v for k, v in interaction.interaction.items()}
    for name in ("item_feature_text", "item_feature_image"):
        setattr(model, name, getattr(model, name).double())

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(7)
        loss = model.calculate_loss(interaction)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast_grads = loss_and_grads()
    convs = [m for m in model.modules() if isinstance(m, CausalDepthwiseConv1d)]
    assert convs and all(m.impl == "auto" for m in convs)
    for module in convs:
        monkeypatch.setattr(module, "impl", "torch")
    monkeypatch.setattr(ssd_module, "ssd_quadratic", ssd_quadratic_before_speedup)
    reference_loss, reference_grads = loss_and_grads()
    torch.testing.assert_close(fast_loss, reference_loss, rtol=1e-10, atol=1e-10)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


# ------------------------------------------------------------------ the time path does not leak
def test_prediction_ignores_padding_and_target_timestamp(time_model):
    config, (train_data, _, test_data), model = time_model()
    assert model.is_time
    interaction = next(iter(test_data))[0].to(model.device)
    items, times = interaction["item_id_list"], interaction["timestamp_list"]
    lengths = interaction["item_length"]
    assert items.shape[1] == 10 and bool((lengths < 10).all())
    padding = torch.arange(10, device=model.device)[None, :] >= lengths[:, None]
    with torch.no_grad():
        reference = model.full_sort_predict(interaction)
        changed = Interaction({key: value.clone() for key, value in interaction.interaction.items()})
        gen = torch.Generator().manual_seed(0)
        noise_items = torch.randint(1, model.n_items, items.shape, generator=gen).to(model.device)
        noise_times = (torch.rand(times.shape, generator=gen) * 3e6).to(model.device)
        changed.interaction["item_id_list"] = torch.where(padding, noise_items, items)
        changed.interaction["timestamp_list"] = torch.where(padding, noise_times, times)
        changed.interaction["timestamp"] = interaction["timestamp"] * 0 + 9.9e9
        torch.testing.assert_close(model.full_sort_predict(changed), reference, rtol=1e-5, atol=1e-5)
        # The time path is live: moving one real timestamp does change the prediction.
        real_times = times.clone()
        real_times[:, 1] = real_times[:, 1] - 5e5
        changed.interaction["timestamp_list"] = real_times
        assert not torch.allclose(model.full_sort_predict(changed), reference, atol=1e-4)


def test_leak_switch_reproduces_the_official_target_timestamp_leak(time_model):
    _, (_, _, test_data), model = time_model(leak_target_timestamp=True)
    interaction = next(iter(test_data))[0].to(model.device)
    with torch.no_grad():
        reference = model.full_sort_predict(interaction)
        interaction.interaction["timestamp"] = interaction["timestamp"] + 7e5
        assert not torch.allclose(model.full_sort_predict(interaction), reference, atol=1e-4)


def test_longer_rows_are_cut_to_their_last_max_len_items(time_model):
    _, (train_data, _, _), model = time_model(MAX_ITEM_LIST_LENGTH=4)
    gen = torch.Generator().manual_seed(1)
    items = torch.randint(1, model.n_items, (5, 9), generator=gen)
    lengths = torch.tensor([9, 6, 4, 3, 1])
    items = items * (torch.arange(9)[None, :] < lengths[:, None])
    times = torch.sort(torch.rand(5, 9, generator=gen) * 1e6, dim=1).values * (items > 0)
    expected_items, expected_times = torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, 4)
    for row, n in enumerate(lengths.tolist()):
        start = max(0, n - 4)
        expected_items[row, : n - start] = items[row, start:n]
        expected_times[row, : n - start] = times[row, start:n]
    on = lambda *tensors: [t.to(model.device) for t in tensors]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(model(*on(items, lengths, times)),
                                   model(*on(expected_items, lengths.clamp(max=4), expected_times)))


def test_wo_time_rows_of_another_width_are_scored_as_their_last_max_len_items(time_model):
    """w/o Time on a pre-split file wider than max_len: the RecBole entry points carry no timestamps."""
    _, _, model = time_model(MAX_ITEM_LIST_LENGTH=4, is_time=False)
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([9, 3])
    items = torch.randint(1, model.n_items, (2, 9), generator=gen) * (torch.arange(9)[None, :] < lengths[:, None])
    cut = torch.zeros(2, 4, dtype=torch.long)
    cut[0], cut[1, :3] = items[0, 5:9], items[1, :3]
    rows = lambda seq, n: Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: n}).to(model.device)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(model.full_sort_predict(rows(items, lengths)),
                                   model.full_sort_predict(rows(cut, lengths.clamp(max=4))))


# ------------------------------------------------------------------ stream roles and the score (eqs. 2, 19)
def test_streams_user_vector_and_scores_follow_the_paper_written_out(time_model):
    """Key stream = modalities[0] (text), query stream = modalities[1] (image), each LN(W f + b + beta)
    (eq. 2); the user vector is the query stream's last-layer output at the last real item; and
    s(u, i) = (h_u . e^k_i / ||e^k_i|| + h_u . e^q_i / ||e^q_i||) / temperature (eq. 19)."""
    temperature = 0.3
    _, (_, _, test_data), model = time_model(temperature=temperature, num_layers=2)
    assert model.key_modality == "text" and model.query_modality == "image" and model.is_modality_bias
    interaction = next(iter(test_data))[0].to(model.device)
    layer_inputs, layer_outputs = [], []
    model.layers[0].register_forward_pre_hook(lambda module, args: layer_inputs.append(args))
    model.layers[-1].register_forward_hook(lambda module, args, out: layer_outputs.append(out))
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        predicted = model.predict(interaction)
    items, lengths = interaction["item_id_list"], interaction["item_length"]

    def embedding(modality, ids):  # e^m = W_m f^m + b_m + beta^m (eq. 2), from the parameters themselves
        adapter = model.adapters[modality]
        return (model.feature_table(modality)[ids] @ adapter.weight.t() + adapter.bias
                + model.item_modality_bias[modality][ids]).detach()

    key_input, _, query_input, _, _ = layer_inputs[0]
    for modality, got in (("text", key_input), ("image", query_input)):
        norm = model.input_norms[modality]
        with torch.no_grad():
            expected = F.layer_norm(embedding(modality, items), (model.hidden_size,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    query_output = layer_outputs[0][2]
    user = query_output[torch.arange(len(items)), lengths - 1]

    def score(row, item):
        total = 0.0
        for modality in ("text", "image"):
            e = embedding(modality, torch.tensor([item]))[0].double()
            total += float(user[row].double() @ e) / math.sqrt(float(e @ e))
        return total / temperature

    for row in range(3):
        for item in (1, 5, model.n_items - 1):
            assert float(full[row, item]) == pytest.approx(score(row, item), rel=1e-4, abs=1e-5)
        assert float(predicted[row]) == pytest.approx(score(row, int(interaction["item_id"][row])), rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ ablation switches and losses
def test_shared_alignment_ssd_runs_on_both_streams_and_separate_switch_adds_one_tissd(time_model):
    _, (train_data, _, _), shared = time_model(perturb=False)
    _, _, separate = time_model(perturb=False, is_shared_ssd=False)
    layer = shared.layers[0]
    calls = []
    layer.alignment_ssd.register_forward_hook(lambda module, args, out: calls.append(args[0].data_ptr()))
    interaction = next(iter(train_data)).to(shared.device)
    with torch.no_grad():
        shared.calculate_loss(interaction)
    assert len(calls) == 2 and calls[0] != calls[1]  # once on the key stream, once on the query stream
    tissd_size = sum(p.numel() for p in separate.layers[0].query_alignment_ssd.parameters())
    assert isinstance(separate.layers[0].query_alignment_ssd, TiSSD)
    assert sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters()) == tissd_size


def test_in_batch_loss_against_per_row_softmax_without_duplicate_negatives(time_model):
    _, (train_data, _, _), model = time_model(in_batch_loss=True)
    interaction = next(iter(train_data)).to(model.device)
    targets = interaction["item_id"].clone()
    targets[1] = targets[0]  # a duplicate target
    interaction.interaction["item_id"] = targets
    with torch.no_grad():
        loss = model.calculate_loss(interaction)
        user = model._user(interaction)
        expected = []
        for j in range(len(targets)):
            logits = [float(model.scores(user[j:j + 1], targets[k:k + 1])) for k in range(len(targets))]
            negatives = [logits[k] for k in range(len(targets)) if targets[k] != targets[j]]
            expected.append(-logits[j] + math.log(math.exp(logits[j]) + sum(math.exp(s) for s in negatives)))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_dataset_without_timestamps_runs_the_wo_time_variant_with_a_warning(scientific_dir, in_tmp_cwd, caplog):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root, n_users=60)
    with caplog.at_level(logging.WARNING):
        _, _, model, _ = build("MMM4Rec", "SciSlice", config_dict=scientific_slice_config(root, **TINY))
    assert model.is_time is False
    assert not any("time" in name for name, _ in model.named_parameters())
    assert any("w/o-Time" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------ transfer
def test_transfer_drops_exactly_the_domain_specific_keys(scientific_dir, in_tmp_cwd):
    root = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, root, n_users=60, name="SciA")
    write_scientific_slice(scientific_dir, root, n_users=90, name="SciB")
    _, _, source, _ = build("MMM4Rec", "SciA", config_dict=scientific_slice_config(root, "SciA", num_layers=2, **TINY))
    _, _, target, _ = build("MMM4Rec", "SciB", config_dict=scientific_slice_config(root, "SciB", num_layers=1, **TINY))
    assert source.n_items != target.n_items  # the bias tables could not even be loaded
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter))
    target_device = next(target.parameters()).device
    path = in_tmp_cwd / "source.pth"
    torch.save({"config": {"model": "MMM4Rec"}, "state_dict": source.state_dict()}, path)
    assert target_device == next(source.parameters()).device
    target_bias_before = {k: v.clone() for k, v in target.item_modality_bias.items()}

    report = load_pretrained(target, path)

    assert report["dropped_domain_specific"] == ["item_modality_bias.image", "item_modality_bias.text"]
    assert report["unexpected"] == sorted(k for k in source.state_dict() if k.startswith("layers.1."))
    assert report["missing"] == ["item_modality_bias.image", "item_modality_bias.text"]
    # feature tables never stored: the model holds them as buffers, the checkpoint does not
    assert {"item_feature_text", "item_feature_image"} <= {name for name, _ in source.named_buffers()}
    assert not any(k.startswith("item_feature_") for k in source.state_dict())
    source_state, target_state = source.state_dict(), target.state_dict()
    for key in target_state:
        if key.startswith("item_modality_bias."):
            assert torch.equal(target_state[key], target_bias_before[key.split(".")[1]])
        else:
            assert torch.equal(target_state[key], source_state[key]), key


def test_parse_dataset_list_accepts_command_line_forms():
    assert parse_dataset_list("[A, B]") == ["A", "B"]
    assert parse_dataset_list("A,B") == ["A", "B"]
    assert parse_dataset_list(["A"]) == ["A"]


# ------------------------------------------------------------------ command line, one epoch each
def cli_tiny_args(**overrides):
    return [f"--{key}={value}" for key, value in {**TINY, **overrides}.items()]


def test_cli_one_epoch_on_scientific(scientific_dir, in_tmp_cwd, capsys):
    args = ["--model=MMM4Rec", "--dataset=Scientific", f"--data_path={scientific_dir.parent}"] + cli_tiny_args(
        train_batch_size=512, eval_batch_size=512)
    assert cli_main(args) == 0
    assert "[recbole-mm] model=MMM4Rec dataset=Scientific" in capsys.readouterr().out


def test_micro_batches_make_the_update_of_the_whole_batch(in_tmp_cwd):
    """MMM4Rec's default trains each batch in pieces of 128 rows (train_micro_batch_size); here pieces of 8 of a
    batch of 32 make the SGD update theta - lr * grad(mean loss over the whole batch), written out from one
    backward pass over the whole batch (time path on, dropout off)."""
    from recbole_mm.config import Config

    root = in_tmp_cwd / "data"
    write_timestamped_dataset(root)
    assert Config("MMM4Rec", "TimeToy", config_dict=timestamped_config(root))["train_micro_batch_size"] == 128
    lr = 0.5
    common = dict(dropout_prob=0.0, embedding_drop_prob=0.0, time_dropout_prob=0.0, learner="sgd",
                  learning_rate=lr, weight_decay=0.0, train_batch_size=32)
    _, (train, _, _), whole, _ = build("MMM4Rec", "TimeToy", config_dict=timestamped_config(
        root, train_micro_batch_size=None, **common))
    _, _, micro, micro_trainer = build("MMM4Rec", "TimeToy", config_dict=timestamped_config(
        root, train_micro_batch_size=8, **common))
    assert micro.is_time and micro_trainer.micro_batch_rows == 8
    batch = next(iter(train))
    assert len(batch) == 32
    micro.load_state_dict(whole.state_dict())
    whole.train()
    whole.calculate_loss(batch).backward()
    expected = {name: (parameter - lr * parameter.grad).detach()
                for name, parameter in whole.named_parameters() if parameter.grad is not None}
    assert len(expected) == len([p for p in whole.parameters() if p.requires_grad])
    micro_trainer._train_epoch([batch], 0)
    for name, parameter in micro.named_parameters():
        assert torch.allclose(parameter, expected[name], rtol=1e-4, atol=1e-6), name


def test_in_batch_loss_trains_on_whole_batches(in_tmp_cwd, caplog):
    """In-batch CE (eq. 21) takes its negatives from the batch's other rows: pieces would change the loss."""
    write_timestamped_dataset(in_tmp_cwd / "data")
    with caplog.at_level(logging.WARNING):
        _, _, model, trainer = build("MMM4Rec", "TimeToy", config_dict=timestamped_config(
            in_tmp_cwd / "data", in_batch_loss=True, train_micro_batch_size=8))
    assert model.loss_couples_batch_rows and trainer.micro_batch_rows is None
    assert any("train_micro_batch_size: 8 is ignored" in record.getMessage() for record in caplog.records)


def test_cli_one_epoch_on_a_timestamped_dataset(in_tmp_cwd, capsys):
    root = in_tmp_cwd / "data"
    write_timestamped_dataset(root)
    config_file = in_tmp_cwd / "time.yaml"
    config_file.write_text(yaml.safe_dump(timestamped_config(root)))
    assert cli_main(["--model=MMM4Rec", "--dataset=TimeToy", f"--config_files={config_file}"]) == 0
    out = capsys.readouterr().out
    assert "[recbole-mm] model=MMM4Rec dataset=TimeToy" in out
    # the time path was built and trained: the time-step modules exist, and gradients reached the time
    # LayerNorm over L (its bias starts at 0 and only a gradient moves it; weight decay alone would not)
    checkpoint = torch.load(out.strip().splitlines()[-1].split("checkpoint=")[1], weights_only=True)
    state = checkpoint["state_dict"]
    assert checkpoint["config"]["is_time"] is True
    assert any(".time_step." in key for key in state) and any(".fourier_filter." in key for key in state)
    assert not torch.equal(state["time_norm.bias"], torch.zeros(10))


def test_cli_pretrain_on_two_datasets_then_fine_tune(scientific_dir, in_tmp_cwd, capsys):
    root = in_tmp_cwd / "data"
    for name, users in (("SciA", 30), ("SciB", 40), ("SciC", 30)):
        write_scientific_slice(scientific_dir, root, n_users=users, name=name)
    config_file = in_tmp_cwd / "sci.yaml"
    base = scientific_slice_config(root, "SciC")
    # one config file for all three datasets: the feature tables get one file name in every folder
    base["feature_tables"] = {"text": {"path": "Shared.feat1CLS", "dim": 512}, "image": {"path": "Shared.feat3CLS", "dim": 512}}
    for name in ("SciA", "SciB", "SciC"):
        for suffix in ("feat1CLS", "feat3CLS"):
            (root / name / f"Shared.{suffix}").symlink_to(root / name / f"{name}.{suffix}")
    config_file.write_text(yaml.safe_dump({k: v for k, v in base.items() if k not in TINY}))
    assert cli_main(["--model=MMM4Rec", "--dataset=SciC", f"--config_files={config_file}",
                     "--pretrain_datasets=[SciA,SciB]"] + cli_tiny_args()) == 0
    checkpoints = sorted(Path("saved").glob("MMM4Rec-pretrain-SciA+SciB-*.pth"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    assert any(k.startswith("layers.1.") for k in state)  # pretrain_config: num_layers 2
    assert not any(k.startswith(("item_modality_bias.", "item_feature_")) for k in state)
    assert "[recbole-mm] model=MMM4Rec dataset=SciC" in capsys.readouterr().out
