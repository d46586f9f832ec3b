"""fMRL operator and per-chunk LayerNorm against independent definitions (paper eq. 2-5)."""

import pytest
import torch

from recbole_mm.model.layers.matryoshka import (
    MatryoshkaLayerNorm,
    MatryoshkaLinear,
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
