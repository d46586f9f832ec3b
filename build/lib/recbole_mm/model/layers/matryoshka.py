"""Full-scale Matryoshka (fMRL) building blocks of fMRLRec (Wang et al., 2024, section 3.2).

Nested sizes ``M = [s_0 < s_1 < ... < s_k]`` cut a hidden vector into chunks ``[s_{j-1}, s_j)``.
Every 2-D weight is constrained so that output chunk ``j`` reads only the input prefix of chunk
``j``: the first ``s_j`` output dims of a layer are a function of the first ``s_j`` input dims
only. Stacking such layers (plus per-chunk LayerNorm and elementwise operations) makes the first
``s`` dims of every hidden state of the full model equal to the hidden states of a standalone
size-``s`` model whose tensors are the leading corners of the full model's tensors.
"""

from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def check_nested_sizes(sizes: Sequence[int], name: str = "mrl_sizes") -> List[int]:
    """Validates a nested size list (positive, strictly increasing) and returns it as a list."""
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ValueError(f"`{name}` is empty: give at least one size, e.g. [8, 16, 32, 64].")
    if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(
            f"`{name}` = {sizes} must be positive and strictly increasing, e.g. [8, 16, 32, 64]."
        )
    return sizes


def chunk_bounds(sizes: Sequence[int]) -> List[tuple]:
    """``[(0, s_0), (s_0, s_1), ...]``: the dims each chunk owns."""
    return list(zip([0] + list(sizes[:-1]), sizes))


class MatryoshkaLinear(nn.Module):
    r"""The fMRL operator (paper eq. 3-5): ``y = x (P \odot W) + b``, stored without the mask.

    Output chunk ``j`` (dims ``[out_sizes[j-1], out_sizes[j])``) is one small ``nn.Linear`` that
    reads input dims ``[0, in_sizes[j])``, which is the non-zero block of the paper's mask ``P``.
    ``in_sizes == out_sizes`` is the square case; ``out_sizes = k * M`` the up-projection (case 1
    of eq. 2), ``in_sizes = k * M`` the down-projection (case 2). A single size gives an ordinary
    dense ``nn.Linear``.
    """

    def __init__(self, in_sizes: Sequence[int], out_sizes: Sequence[int], bias: bool = True):
        super().__init__()
        self.in_sizes = check_nested_sizes(in_sizes, "in_sizes")
        self.out_sizes = check_nested_sizes(out_sizes, "out_sizes")
        if len(self.in_sizes) != len(self.out_sizes):
            raise ValueError(
                f"MatryoshkaLinear needs one input size per output size, got in_sizes="
                f"{self.in_sizes} and out_sizes={self.out_sizes}."
            )
        self.chunks = nn.ModuleList(
            nn.Linear(in_size, out_end - out_start, bias=bias)
            for in_size, (out_start, out_end) in zip(self.in_sizes, chunk_bounds(self.out_sizes))
        )

    @property
    def in_features(self) -> int:
        return self.in_sizes[-1]

    @property
    def out_features(self) -> int:
        return self.out_sizes[-1]

    def masked_weight(self) -> torch.Tensor:
        """The dense ``P \\odot W`` of eq. 5: each chunk's weight, zero-padded to the full input width."""
        return torch.cat(
            [F.pad(chunk.weight, (0, self.in_features - in_size)) for chunk, in_size in zip(self.chunks, self.in_sizes)],
            dim=0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM with the masked dense weight (eq. 5): faster than a loop of small GEMMs,
        whose sliced inputs and concatenated outputs cost more than the masked zeros."""
        self._check_input(x)
        bias = None if self.chunks[0].bias is None else torch.cat([chunk.bias for chunk in self.chunks])
        return F.linear(x, self.masked_weight(), bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 3 literally: output chunk ``j`` = chunk ``j``'s Linear on the input prefix ``[0, in_sizes[j])``."""
        self._check_input(x)
        return torch.cat(
            [chunk(x[..., :in_size]) for chunk, in_size in zip(self.chunks, self.in_sizes)], dim=-1
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MatryoshkaLinear expects {self.in_features} input features, got {x.shape[-1]}."
            )


class MatryoshkaLayerNorm(nn.Module):
    """LayerNorm applied to each nested chunk on its own, so a chunk's output never depends on
    later chunks (a single LayerNorm over all ``d`` dims would mix them through mean/variance)."""

    def __init__(self, sizes: Sequence[int], eps: float = 1e-5):
        super().__init__()
        self.sizes = check_nested_sizes(sizes)
        self.eps = eps
        self.chunks = nn.ModuleList(nn.LayerNorm(end - start, eps=eps) for start, end in chunk_bounds(self.sizes))
        # membership[j, c] = 1 / width_j if dim c lies in chunk j: x @ membership.T gives chunk means.
        membership = torch.zeros(len(self.sizes), self.sizes[-1])
        for j, (start, end) in enumerate(chunk_bounds(self.sizes)):
            membership[j, start:end] = 1.0 / (end - start)
        self.register_buffer("membership", membership, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All chunks at once: chunk means and variances by two thin GEMMs, broadcast back with
        the 0/1 pattern; avoids slicing the activations into per-chunk copies."""
        membership = self.membership.to(x.dtype)
        spread = (membership > 0).to(x.dtype)
        centered = x - (x @ membership.T) @ spread
        variance = (centered * centered) @ membership.T
        normalised = centered * (torch.rsqrt(variance + self.eps) @ spread)
        weight = torch.cat([chunk.weight for chunk in self.chunks])
        bias = torch.cat([chunk.bias for chunk in self.chunks])
        return normalised * weight + bias

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """One ``nn.LayerNorm`` per chunk slice, concatenated."""
        return torch.cat(
            [norm(x[..., start:end]) for norm, (start, end) in zip(self.chunks, chunk_bounds(self.sizes))],
            dim=-1,
        )


def leading_corner(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor[:shape[0], :shape[1], ...]``, refusing shapes that are not a corner of ``tensor``."""
    if tensor.dim() != len(shape) or any(small > big for small, big in zip(shape, tensor.shape)):
        raise ValueError(
            f"cannot take a {tuple(shape)} corner of a {tuple(tensor.shape)} tensor: the two "
            f"models are not nested (different layer structure or larger target size)."
        )
    return tensor[tuple(slice(0, n) for n in shape)]


def nested_state_dict(small: nn.Module, full_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """State dict for ``small`` (an fMRL model built with a prefix of the full model's sizes)
    made of the leading corners of the full model's tensors: the extraction of paper section 3.2
    ("take the first [0:M[j], 0:kM[j]] slice of each W_i"). Chunks of fMRL layers are copied
    whole (a chunk whose shape differs means the size lists are not prefixes of each other);
    chunks beyond the small model's largest size are not copied. Returns copies."""
    whole_chunks = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in small.named_modules()
        if isinstance(module, (MatryoshkaLinear, MatryoshkaLayerNorm))
        for name in module.state_dict()
    }
    extracted = {}
    for name, target in small.state_dict().items():
        if name not in full_state:
            raise KeyError(
                f"extraction: the full model has no tensor `{name}`; was it trained with the same "
                f"architecture options (n_layers, modalities, ffn_expansion)?"
            )
        source = full_state[name]
        if name in whole_chunks and source.shape != target.shape:
            raise ValueError(
                f"extraction: chunk `{name}` is {tuple(source.shape)} in the full model but "
                f"{tuple(target.shape)} in the small one: the models are not nested (the small "
                f"model's sizes must be a prefix of the full model's mrl_sizes)."
            )
        extracted[name] = leading_corner(source, target.shape).clone()
    return extracted
