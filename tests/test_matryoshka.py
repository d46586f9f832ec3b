"""fMRL operator and per-chunk LayerNorm against independent definitions (paper eq. 2-5)."""

import pytest
import torch
from torch import nn

from recbole_mm.model.layers.matryoshka import (
    MatryoshkaLayerNorm,
    MatryoshkaLinear,
    check_nested_sizes,
    leading_corner,
    nested_state_dict,
)

SIZES = [2, 4, 8, 16]


def explicit_mask(in_sizes, out_sizes):
    """Paper eq. 4: P[r, c] = 1 iff weight (r, c) belongs to the slice W^(j) of r's output chunk."""
    mask = torch.zeros(out_sizes[-1], in_sizes[-1], dtype=torch.float64)
    for r in range(out_sizes[-1]):
        j = next(j for j, end in enumerate(out_sizes) if r < end)
        for c in range(in_sizes[-1]):
            mask[r, c] = 1.0 if c < in_sizes[j] else 0.0
    return mask


def load_from_dense(layer, dense_weight, bias):
    """Give each chunk the rows of the dense (out, in) weight it owns, restricted to its inputs."""
    start = 0
    with torch.no_grad():
        for chunk, in_size, end in zip(layer.chunks, layer.in_sizes, layer.out_sizes):
            chunk.weight.copy_(dense_weight[start:end, :in_size])
            chunk.bias.copy_(bias[start:end])
            start = end


@pytest.mark.parametrize(
    "in_sizes,out_sizes",
    [
        (SIZES, SIZES),  # square, case 3
        (SIZES, [4 * s for s in SIZES]),  # up-projection D x kD, case 1
        ([4 * s for s in SIZES], SIZES),  # down-projection kD x D, case 2
        ([3, 5, 12], [3, 5, 12]),  # sizes need not be powers of two
        ([16], [16]),  # one size: plain dense linear
    ],
)
def test_chunked_layer_equals_masked_dense_matrix(in_sizes, out_sizes):
    torch.manual_seed(0)
    layer = MatryoshkaLinear(in_sizes, out_sizes).double()
    dense = torch.randn(out_sizes[-1], in_sizes[-1], dtype=torch.float64)
    bias = torch.randn(out_sizes[-1], dtype=torch.float64)
    load_from_dense(layer, dense, bias)
    x = torch.randn(3, 5, in_sizes[-1], dtype=torch.float64)
    expected = x @ (explicit_mask(in_sizes, out_sizes) * dense).T + bias  # eq. 5
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_reference(x), expected, rtol=1e-12, atol=1e-12)


def test_gradients_reach_only_the_unmasked_block():
    """A loss on output chunk j alone: the input gradient is zero beyond in_sizes[j], chunk j's weight
    gradient is the unmasked block of the dense gradient dL/dW = g^T x, every other chunk gets zero."""
    torch.manual_seed(0)
    out_sizes = [2 * s for s in SIZES]
    layer = MatryoshkaLinear(SIZES, out_sizes).double()
    bounds = list(zip([0] + out_sizes[:-1], out_sizes))
    for j, (start, end) in enumerate(bounds):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        upstream = torch.zeros(4, out_sizes[-1], dtype=torch.float64)
        upstream[:, start:end] = torch.randn(4, end - start, dtype=torch.float64)
        (layer(x) * upstream).sum().backward()
        assert torch.count_nonzero(x.grad[:, SIZES[j]:]) == 0
        assert x.grad[:, : SIZES[j]].abs().sum() > 0
        dense_gradient = upstream.T @ x.detach()  # dL/dW for y = x W^T
        for k, chunk in enumerate(layer.chunks):
            expected = dense_gradient[bounds[k][0]:bounds[k][1], : SIZES[k]]
            torch.testing.assert_close(chunk.weight.grad, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(chunk.bias.grad, upstream[:, bounds[k][0]:bounds[k][1]].sum(0))
            assert (chunk.weight.grad.abs().sum() > 0) == (k == j)


def test_chunked_layer_stores_only_the_unmasked_block():
    layer = MatryoshkaLinear(SIZES, SIZES)
    n_weights = sum(chunk.weight.numel() for chunk in layer.chunks)
    assert n_weights == int(explicit_mask(SIZES, SIZES).sum())


def test_chunked_layernorm_equals_per_chunk_reference():
    torch.manual_seed(0)
    norm = MatryoshkaLayerNorm(SIZES, eps=1e-5).double()
    with torch.no_grad():
        for chunk in norm.chunks:
            chunk.weight.normal_()
            chunk.bias.normal_()
    x = 3 * torch.randn(4, 7, SIZES[-1], dtype=torch.float64) + 1
    pieces = []
    for chunk, (start, end) in zip(norm.chunks, [(0, 2), (2, 4), (4, 8), (8, 16)]):
        part = x[..., start:end]
        mean = part.mean(-1, keepdim=True)
        var = ((part - mean) ** 2).mean(-1, keepdim=True)
        pieces.append((part - mean) / torch.sqrt(var + 1e-5) * chunk.weight + chunk.bias)
    torch.testing.assert_close(norm(x), torch.cat(pieces, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm.forward_reference(x), torch.cat(pieces, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k_in,k_out", [(1, 1), (1, 3), (2, 1)])
@pytest.mark.parametrize("n_kept", [1, 2, 3])
def test_extracted_layer_is_smaller_and_computes_the_prefix(k_in, k_out, n_kept):
    torch.manual_seed(0)
    full = MatryoshkaLinear([k_in * s for s in SIZES], [k_out * s for s in SIZES]).double()
    small = MatryoshkaLinear([k_in * s for s in SIZES[:n_kept]], [k_out * s for s in SIZES[:n_kept]]).double()
    small.load_state_dict(nested_state_dict(small, full.state_dict()))
    s = SIZES[n_kept - 1]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    x = torch.randn(6, k_in * SIZES[-1], dtype=torch.float64)
    torch.testing.assert_close(small(x[..., : k_in * s]), full(x)[..., : k_out * s], rtol=1e-12, atol=1e-12)


def test_extracted_layernorm_computes_the_prefix():
    torch.manual_seed(0)
    full = MatryoshkaLayerNorm(SIZES).double()
    with torch.no_grad():
        for chunk in full.chunks:
            chunk.weight.normal_()
    small = MatryoshkaLayerNorm(SIZES[:2]).double()
    small.load_state_dict(nested_state_dict(small, full.state_dict()))
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(small(x[..., :4]), full(x)[..., :4], rtol=1e-12, atol=1e-12)


def test_extraction_refuses_non_nested_models():
    full = MatryoshkaLinear(SIZES, SIZES)
    with pytest.raises(ValueError, match="not nested"):
        nested_state_dict(MatryoshkaLinear([2, 4, 6], [2, 4, 6]), full.state_dict())


@pytest.mark.parametrize("sizes", [[], [4, 4], [8, 4], [0, 4]])
def test_bad_sizes_are_rejected(sizes):
    with pytest.raises(ValueError):
        MatryoshkaLinear(sizes, sizes)


def test_size_errors_name_the_setting_and_the_fix():
    """The messages name the user's config key (`mrl_sizes`) or the argument, the value and an example."""
    with pytest.raises(ValueError, match=r"^`mrl_sizes` is empty: give at least one size, e\.g\. \[8, 16, 32, 64\]"):
        check_nested_sizes([])
    with pytest.raises(ValueError, match=r"^`mrl_sizes` = \[8, 8\] must be positive and strictly increasing"):
        check_nested_sizes([8, 8])
    with pytest.raises(ValueError, match=r"^`in_sizes` = \[4, 2\] must be"):
        MatryoshkaLinear([4, 2], [2, 4])
    with pytest.raises(ValueError, match=r"^`out_sizes` = \[4, 2\] must be"):
        MatryoshkaLinear([2, 4], [4, 2])
    with pytest.raises(ValueError, match=r"one input size per output size, got in_sizes=\[2, 4\] and out_sizes=\[4\]"):
        MatryoshkaLinear([2, 4], [4])
    with pytest.raises(ValueError, match="^MatryoshkaLinear expects 16 input features, got 15\\.$"):
        MatryoshkaLinear(SIZES, SIZES)(torch.randn(2, 3, 15))
    assert check_nested_sizes([1, 4]) == [1, 4]  # a size of one is a valid (tiny) model


def test_layer_without_bias_has_none():
    layer = MatryoshkaLinear(SIZES, SIZES, bias=False)
    assert all(chunk.bias is None for chunk in layer.chunks)
    x = torch.randn(3, SIZES[-1])
    torch.testing.assert_close(layer(x), x @ layer.masked_weight().T)


def test_layernorm_default_eps_is_torch_default_and_reaches_every_chunk():
    """On inputs whose chunk variance is comparable to eps, the written-out formula with eps = 1e-5
    (nn.LayerNorm's default) and with a custom eps tells the two apart."""
    x = 3e-3 * torch.randn(4, SIZES[-1], dtype=torch.float64)
    for norm, eps in ((MatryoshkaLayerNorm(SIZES).double(), 1e-5), (MatryoshkaLayerNorm(SIZES, eps=1e-3).double(), 1e-3)):
        pieces = []
        for start, end in zip([0] + SIZES[:-1], SIZES):
            part = x[..., start:end]
            centred = part - part.mean(-1, keepdim=True)
            pieces.append(centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + eps))
        torch.testing.assert_close(norm(x), torch.cat(pieces, -1), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(norm.forward_reference(x), torch.cat(pieces, -1), rtol=1e-10, atol=1e-10)


def test_layernorm_in_float32_takes_double_input():
    """The membership buffer follows the input's dtype (a float32 module on float64 activations)."""
    norm = MatryoshkaLayerNorm(SIZES)
    x = torch.randn(3, SIZES[-1], dtype=torch.float64)
    out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, norm.double().forward_reference(x), rtol=1e-6, atol=1e-6)


def test_corner_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"cannot take a \(4,\) corner of a \(4, 4\) tensor: the two models are not nested"):
        leading_corner(torch.zeros(4, 4), torch.Size([4]))
    with pytest.raises(ValueError, match=r"cannot take a \(5, 2\) corner of a \(4, 4\) tensor"):
        leading_corner(torch.zeros(4, 4), torch.Size([5, 2]))
    torch.testing.assert_close(leading_corner(torch.arange(16.0).view(4, 4), torch.Size([2, 3])),
                               torch.tensor([[0.0, 1, 2], [4, 5, 6]]))


def test_extraction_inside_a_model_and_missing_tensors():
    """Chunks of a layer nested in a model are recognised by their full names; a tensor the full model
    lacks is named with the architecture options to check."""
    full = nn.Sequential(MatryoshkaLinear(SIZES, SIZES), MatryoshkaLayerNorm(SIZES))
    with pytest.raises(ValueError, match=r"chunk `0\.chunks\.2\.weight` is \(4, 8\) in the full model but \(2, 6\)"):
        nested_state_dict(nn.Sequential(MatryoshkaLinear([2, 4, 6], [2, 4, 6]), MatryoshkaLayerNorm([2, 4, 6])),
                          full.state_dict())
    with pytest.raises(KeyError, match=r"the full model has no tensor `2\.weight`; was it trained with the same"):
        nested_state_dict(nn.Sequential(MatryoshkaLinear(SIZES[:2], SIZES[:2]), MatryoshkaLayerNorm(SIZES[:2]),
                                        nn.Linear(4, 4)), full.state_dict())
