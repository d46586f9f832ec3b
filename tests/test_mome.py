"""Speeder's MRC block (recbole_mm/model/layers/mome.py) against direct definitions."""

import pytest
import torch

from recbole_mm.model.layers.mome import FeedForwardAdapter, ModalityExpert, ModalityGate, MoMELayer, MultimodalItemCompressor

MODALITIES = ["text", "image", "id"]


def make_compressor(gate="tanh", seed=0):
    torch.manual_seed(seed)
    compressor = MultimodalItemCompressor(
        {"text": 6, "image": 5, "id": 4}, hidden_size=8, output_size=10, n_heads=2, gate=gate, dropout=0.0
    )
    return compressor.eval()


def features(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randn(n, 6, generator=g), "image": torch.randn(n, 5, generator=g), "id": torch.randn(n, 4, generator=g)}


def test_hard_routing_each_token_only_through_its_expert():
    torch.manual_seed(0)
    layer = MoMELayer(8, 2, 16, 0.0, MODALITIES).eval()
    hidden = torch.randn(4, 3, 8)
    routed = layer.route(hidden, MODALITIES)
    for k, modality in enumerate(MODALITIES):  # brute force: position k through expert k
        expert = layer.experts[modality]
        expected = expert.norm(expert.ffn(hidden[:, k])) + hidden[:, k]
        torch.testing.assert_close(routed[:, k], expected)
    changed = hidden.clone()
    changed[:, 1] = torch.randn(4, 8) * 5  # the image token
    rerouted = layer.route(changed, MODALITIES)
    torch.testing.assert_close(rerouted[:, 0], routed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(rerouted[:, 2], routed[:, 2], rtol=0, atol=0)
    assert not torch.allclose(rerouted[:, 1], routed[:, 1])


def test_text_expert_sees_only_text_token_and_ignores_other_experts():
    compressor = make_compressor()
    layer = compressor.modality_layers[0]
    seen = []
    handle = layer.experts["text"].register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    feats = features()
    compressor(feats)
    (text_input, text_output), = seen
    hidden = compressor.embed_modalities(feats)
    attended, _ = layer.attention(hidden, hidden, hidden, need_weights=False)
    after_attention = layer.attention_norm(attended + hidden)
    torch.testing.assert_close(text_input, after_attention[:, 0])
    handle.remove()
    # changing the visual / sequential experts' weights never reaches the layer's text token, and
    # does reach the other tokens (the layer's output, not the text expert's own, which could not change)
    outputs = []
    layer_handle = layer.register_forward_hook(lambda module, args, out: outputs.append(out))
    compressor(feats)
    with torch.no_grad():
        for name in ("image", "id"):
            for p in layer.experts[name].parameters():
                p.add_(torch.randn_like(p))
    compressor(feats)
    layer_handle.remove()
    before, after = outputs
    torch.testing.assert_close(before[:, 0], text_output)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)
    assert not torch.allclose(after[:, 1], before[:, 1]) and not torch.allclose(after[:, 2], before[:, 2])


@pytest.mark.parametrize("kind", ["tanh", "relu", "none"])
def test_gate_math(kind):
    torch.manual_seed(0)
    gate = ModalityGate(8, kind)
    if gate.adapter is not None:
        torch.nn.init.normal_(gate.adapter.weight)
        torch.nn.init.normal_(gate.adapter.bias)
    e = torch.randn(5, 8)
    if kind == "none":
        expected = e
    else:
        pre = e @ gate.adapter.weight.T + gate.adapter.bias
        expected = (torch.tanh(pre) if kind == "tanh" else torch.clamp(pre, min=0)) * e
    torch.testing.assert_close(gate(e), expected)


def test_tanh_gate_starts_closed_and_text_is_ungated():
    compressor = make_compressor()
    assert set(compressor.gates) == {"image", "id"}
    image = compressor.adapters["image"](torch.randn(3, 5))
    assert torch.count_nonzero(compressor.gates["image"](image)) == 0


def test_missing_modality_equals_leaving_it_out():
    compressor = make_compressor()
    feats = features()
    present = {"image": torch.tensor([True, False, True, False, True, True, True])}
    both = compressor({"text": feats["text"], "image": feats["image"]}, present)
    text_only = compressor({"text": feats["text"]})
    torch.testing.assert_close(both[1], text_only[1])
    torch.testing.assert_close(both[3], text_only[3])
    assert not torch.allclose(both[0], text_only[0])
    assert both.shape == (7, 10)


def test_average_pooling_of_mome_output():
    compressor = make_compressor()
    feats = features()
    hidden = compressor.embed_modalities(feats)
    for layer in list(compressor.modality_layers) + list(compressor.multimodal_layers):
        hidden = layer(hidden, MODALITIES)
    expected = compressor.output_adapter(hidden.mean(dim=1))
    torch.testing.assert_close(compressor(feats), expected)


def test_parameter_groups_partition_the_block():
    compressor = make_compressor()
    groups = [compressor.modality_parameters(m) for m in MODALITIES]
    groups += [compressor.fusion_parameters(), list(compressor.output_adapter.parameters())]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in compressor.parameters()}
    text_ids = {id(p) for p in compressor.modality_parameters("text")}
    assert {id(p) for p in compressor.adapters["text"].parameters()} <= text_ids
    assert {id(p) for p in compressor.modality_layers[0].experts["text"].parameters()} <= text_ids


def _adapter(adapter, x):
    first, last = adapter.net[0], adapter.net[2]
    return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, first.weight, first.bias)),
                                      last.weight, last.bias)


def _layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(attention, hidden, keep):
    """Multi-head self-attention written out (eqs. 5-6): per head softmax(Q K^T / sqrt(d_h)) V over the
    kept tokens, heads concatenated, output projection."""
    n, m, d = hidden.shape
    heads = attention.num_heads
    q, k, v = (torch.nn.functional.linear(hidden, w, b) for w, b in
               zip(attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3)))
    split = lambda t: t.view(n, m, heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    mixed = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, m, d)
    return torch.nn.functional.linear(mixed, attention.out_proj.weight, attention.out_proj.bias)


def _expert(expert, x):
    first, second = expert.ffn[0], expert.ffn[2]
    inner = torch.relu(torch.nn.functional.linear(x, first.weight, first.bias))
    return _layer_norm(expert.norm, torch.nn.functional.linear(inner, second.weight, second.bias)) + x


def test_compressor_equals_the_block_written_out_with_missing_modalities():
    """MRC end to end against eqs. 1-10 written out with the module's weights: GELU adapters, the tanh gate
    on non-text tokens, masked MHSA + LayerNorm, hard-routed ReLU experts (L1) then the multimodal expert
    (L2), average pooling over present tokens only, output adapter. Item 0 has only its text (pooling
    divides by 1), item 1 has no image, item 4 has nothing."""
    torch.manual_seed(4)
    compressor = MultimodalItemCompressor({"text": 6, "image": 5, "id": 4}, hidden_size=8, output_size=10, n_heads=2,
                                          dropout=0.0, modality_layers=2, multimodal_layers=2).double().eval()
    with torch.no_grad():  # open the gates, so the gate term is non-trivial
        for gate in compressor.gates.values():
            gate.adapter.weight.normal_()
            gate.adapter.bias.normal_()
    feats = {m: t.double() for m, t in features(n=5, seed=6).items()}
    present = {"text": torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool),
               "image": torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool),
               "id": torch.tensor([0, 1, 1, 1, 0], dtype=torch.bool)}
    tokens = []
    for m in MODALITIES:
        e = _adapter(compressor.adapters[m], feats[m])
        if m != "text":
            gate = compressor.gates[m].adapter
            e = torch.tanh(torch.nn.functional.linear(e, gate.weight, gate.bias)) * e
        tokens.append(e)
    hidden = torch.stack(tokens, dim=1)
    keep = torch.stack([present[m] for m in MODALITIES], dim=1)
    for layer in list(compressor.modality_layers) + list(compressor.multimodal_layers):
        hidden = _layer_norm(layer.attention_norm, _attention(layer.attention, hidden, keep) + hidden)
        if layer.hard_routed:
            hidden = torch.stack([_expert(layer.experts[m], hidden[:, k]) for k, m in enumerate(MODALITIES)], dim=1)
        else:
            hidden = _expert(layer.experts["multimodal"], hidden)
    weights = keep.double().unsqueeze(-1)
    pooled = (hidden[:4] * weights[:4]).sum(1) / weights[:4].sum(1)
    # item 4 has no modality at all: nothing to pool, so it gets A_f(0) (and no NaN from an all-masked row)
    expected = _adapter(compressor.output_adapter, torch.cat([pooled, torch.zeros(1, 8, dtype=torch.float64)]))
    torch.testing.assert_close(compressor(feats, present), expected, rtol=1e-10, atol=1e-10)


def test_default_compressor_structure_written_out():
    """Defaults: 2 heads, one L1 and one L2 layer, FFN inner size 4 d, dropout 0.1 everywhere (attention and
    experts), tanh gates on the non-text modalities; adapters Linear(D_m, d) GELU Linear(d, d), output adapter
    Linear(d, out) GELU Linear(out, out). Parameter count written out from those shapes."""
    compressor = MultimodalItemCompressor({"text": 6, "image": 5}, hidden_size=8, output_size=10)
    d, inner = 8, 32
    linear = lambda i, o: i * o + o  # noqa: E731
    norm = 2 * d
    adapters = linear(6, d) + linear(d, d) + linear(5, d) + linear(d, d)
    gates = linear(d, d)  # image only
    attention_block = 3 * d * d + 3 * d + linear(d, d) + norm
    expert = linear(d, inner) + linear(inner, d) + norm
    layers = (attention_block + 2 * expert) + (attention_block + expert)
    output = linear(d, 10) + linear(10, 10)
    assert sum(p.numel() for p in compressor.parameters()) == adapters + gates + layers + output
    assert len(compressor.modality_layers) == 1 and len(compressor.multimodal_layers) == 1
    assert set(compressor.gates) == {"image"} and compressor.gates["image"].kind == "tanh"
    for layer in (*compressor.modality_layers, *compressor.multimodal_layers):
        assert layer.attention.num_heads == 2 and layer.attention.dropout == 0.1
        assert all(expert.ffn[3].p == 0.1 for expert in layer.experts.values())


def test_adapter_hidden_size_and_expert_dropout():
    adapter = FeedForwardAdapter(4, 8, hidden_size=16)
    assert adapter.net[0].out_features == 16 and adapter.net[2].in_features == 16
    assert FeedForwardAdapter(4, 8).net[0].out_features == 8
    torch.manual_seed(0)
    expert = ModalityExpert(8, 16, dropout=0.5)
    x = torch.randn(64, 8)
    assert not torch.allclose(expert.train()(x), expert.eval()(x))  # the FFN's dropout is active in training


def test_block_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"^gate='sigmoid': choose one of tanh, relu, none\.$"):
        ModalityGate(8, "sigmoid")
    assert ModalityGate(8).kind == "tanh"  # eq. 18's gate unless an ablation asks otherwise
    assert {gate.kind for gate in make_compressor(gate="relu").gates.values()} == {"relu"}
    gate = ModalityGate(8, "none")
    assert gate.adapter is None and not list(gate.parameters())
    with pytest.raises(ValueError, match=r"^mome_hidden_size=8 must be divisible by mome_n_heads=3\.$"):
        MoMELayer(8, 3, 16, 0.0)
    with pytest.raises(ValueError, match="^MultimodalItemCompressor needs at least one modality.$"):
        MultimodalItemCompressor({}, hidden_size=8, output_size=10)
    with pytest.raises(KeyError, match=r"unknown modalities \['audio'\]; this compressor has \['text', 'image', 'id'\]"):
        make_compressor()({"text": torch.randn(2, 6), "audio": torch.randn(2, 3)})


def test_no_attention_row_is_fully_masked_for_an_item_without_modalities():
    """Every key masked would be a softmax over -inf (NaN where torch does not special-case it): an item
    with no modality attends over all its tokens instead; the others mask exactly their absent ones."""
    compressor = make_compressor()
    masks = []
    for layer in (*compressor.modality_layers, *compressor.multimodal_layers):
        layer.attention.register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs["key_padding_mask"].clone()), with_kwargs=True)
    present = {"text": torch.tensor([1, 0, 1], dtype=torch.bool), "image": torch.tensor([1, 1, 0], dtype=torch.bool),
               "id": torch.tensor([0, 1, 0], dtype=torch.bool)}
    compressor(features(n=3), present)
    expected = torch.tensor([[False, False, True], [True, False, False], [False, True, True]])
    assert len(masks) == 2 and all(torch.equal(mask, expected) for mask in masks)
    masks.clear()
    compressor(features(n=3), {m: torch.tensor([1, 1, 0], dtype=torch.bool) for m in present})
    assert all(torch.equal(mask, torch.zeros(3, 3, dtype=torch.bool)) for mask in masks)  # item 2: none present
