"""Speeder's MRC block (recbole_mm/model/layers/mome.py) against direct definitions."""

import pytest
import torch

from recbole_mm.model.layers.mome import ModalityGate, MoMELayer, MultimodalItemCompressor

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
