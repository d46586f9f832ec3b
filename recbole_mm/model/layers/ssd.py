"""State space duality (SSD) core of Mamba-2, as used by MMM4Rec's TiSSD / TiCoSSD blocks.

One function, several implementations that compute the same thing (tests hold them equal):

- ``ssd_naive``: the recurrence itself, a Python loop over time. The definition and the test oracle.
- ``ssd_quadratic``: the dual "masked attention" form, O(L^2) per head.
- ``ssd_chunked``: quadratic inside chunks of ``chunk_size`` plus a state recurrence between chunks,
  O(L * chunk_size) per head; any length (the tail chunk is zero-padded, which a causal scan ignores).
- ``mamba_ssm``: the fused Triton kernel ``mamba_chunk_scan_combined`` (CUDA + mamba-ssm only).

Function (ZOH discretisation, scalar A per head; as MMM4Rec's TiSSD, Mamba-2 paper eq. for SSD):
    h_t = exp(delta_t * A) h_{t-1} + delta_t * B_t x_t^T
    y_t = C_t^T h_t + D * delta_t * x_t

The skip term is D * delta * x (the MMM4Rec code multiplies x by delta before adding D); mamba-ssm's
kernel adds D * x. Every path here therefore runs its scan without D and adds D * delta * x itself.

Shapes: x (batch, L, heads, head_dim); delta (batch, L, heads), the positive step size (softplus
already applied, see ``discretization_step``); A (heads,), negative; B, C (batch, L, groups, d_state)
with heads divisible by groups (head h reads group h // (heads // groups), as in mamba-ssm);
D (heads,) or None. Output y like x. Computation runs in float32 (float64 inputs stay float64) and
returns x's dtype.
"""

import functools
import importlib.util
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

SSD_IMPLS = ("auto", "torch_quadratic", "torch_chunked", "mamba_ssm")
CONV_IMPLS = ("auto", "torch", "shifted", "causal_conv1d")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Optional CUDA kernels, imported lazily. A failed import is kept (not swallowed): ``auto`` falls back
# to torch with one logged warning on CUDA, an explicit request chains it into its error, and
# RECBOLE_MM_REQUIRE_KERNELS=1 turns any CUDA fallback into an error (for GPU test runs).
# ----------------------------------------------------------------------------------------------
REQUIRE_KERNELS_ENV = "RECBOLE_MM_REQUIRE_KERNELS"


@functools.lru_cache(maxsize=None)
def _import_kernel(package):
    """(function, None) when the kernel imports, (None, the exception) otherwise."""
    try:
        if package == "mamba_ssm":
            # Released mamba-ssm imports its compiled selective_scan_cuda from mamba_ssm/__init__, even
            # for the Triton SSD kernel: an ABI mismatch surfaces here as ImportError/OSError.
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as function
        else:
            from causal_conv1d import causal_conv1d_fn as function
    except Exception as error:  # ImportError, or OSError/RuntimeError from a CUDA extension
        return None, error
    return function, None


def mamba_chunk_scan_kernel():
    """mamba-ssm's ``mamba_chunk_scan_combined`` or None when it cannot be imported here."""
    return _import_kernel("mamba_ssm")[0]


def mamba_import_error():
    """The exception that importing mamba-ssm's SSD kernel raised here, or None."""
    return _import_kernel("mamba_ssm")[1]


def causal_conv1d_kernel():
    """causal-conv1d's ``causal_conv1d_fn`` or None when it cannot be imported here."""
    return _import_kernel("causal_conv1d")[0]


def causal_conv1d_import_error():
    return _import_kernel("causal_conv1d")[1]


def kernel_package_installed(package):
    """The package is on the path (whether or not its compiled parts import)."""
    return importlib.util.find_spec(package) is not None


@functools.lru_cache(maxsize=None)
def _fall_back_on_cuda(package):
    """Say once per package why a CUDA run uses the torch path; raise under RECBOLE_MM_REQUIRE_KERNELS=1."""
    error = _import_kernel(package)[1]
    reason = (f"{package} is not installed (pip install 'recbole-mm[cuda]', see docs/benchmarks.md)"
              if not kernel_package_installed(package) else f"{package} is installed but does not import: {error!r}")
    if os.environ.get(REQUIRE_KERNELS_ENV) == "1":
        raise RuntimeError(f"{REQUIRE_KERNELS_ENV}=1 and {reason}") from error
    logger.warning("CUDA tensors but %s; using the PyTorch path instead.", reason)


def discretization_step(dt, dt_bias=None):
    """delta = softplus(dt + dt_bias): the positive ZOH step size every SSD path takes."""
    if dt_bias is not None:
        dt = dt + dt_bias
    return F.softplus(dt)


def _check_shapes(x, delta, A, B, C, D):
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, L, heads, head_dim), got {tuple(x.shape)}")
    batch, length, heads, _ = x.shape
    if delta.shape != (batch, length, heads):
        raise ValueError(f"ssd: delta must be {(batch, length, heads)}, got {tuple(delta.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"ssd: A must be ({heads},), got {tuple(A.shape)}")
    if B.shape != C.shape or B.dim() != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"ssd: B and C must be (batch, L, groups, d_state), got {tuple(B.shape)}, {tuple(C.shape)}")
    if heads % B.shape[2] != 0:
        raise ValueError(f"ssd: heads ({heads}) must be divisible by groups ({B.shape[2]})")
    if D is not None and D.shape != (heads,):
        raise ValueError(f"ssd: D must be ({heads},) or None, got {tuple(D.shape)}")


def _compute_dtype(x):
    """float32 for half/bfloat16/float32 inputs (exp of segment sums needs it), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _groups_to_heads(BC, heads):
    """(b, L, g, n) -> (b, L, heads, n): head h reads group h // (heads // g)."""
    if BC.shape[2] == heads:
        return BC
    return BC.repeat_interleave(heads // BC.shape[2], dim=2)


def _skip(y, x, delta, D):
    if D is None:
        return y
    dtype = y.dtype
    return y + D.to(dtype)[:, None] * delta.to(dtype)[..., None] * x.to(dtype)


def segment_sum(a):
    """(..., T) -> (..., T, T) with out[..., t, s] = a[s+1] + ... + a[t] for t >= s, -inf above.

    exp(segment_sum(A * delta)) is SSD's structured mask L_ts. Built from masked cumulative sums
    (not differences of one cumsum) so no large terms cancel.
    """
    length = a.shape[-1]
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), -1)
    per_step = a[..., None, :].expand(*a.shape, length).transpose(-1, -2)  # [..., t, s] = a[t]
    sums = per_step.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~lower, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Reference: the recurrence.
# ----------------------------------------------------------------------------------------------
def ssd_naive(x, delta, A, B, C, D=None):
    """The SSD recurrence step by step (reference for tests; O(L) sequential Python steps)."""
    _check_shapes(x, delta, A, B, C, D)
    batch, length, heads, head_dim = x.shape
    dtype = _compute_dtype(x)
    xf, deltaf, Af = x.to(dtype), delta.to(dtype), A.to(dtype)
    Bh, Ch = _groups_to_heads(B.to(dtype), heads), _groups_to_heads(C.to(dtype), heads)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(deltaf[:, t] * Af)  # (b, h)
        update = (deltaf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + update
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(outputs, dim=1)
    return _skip(y, x, delta, D).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Fast pure-PyTorch forms.
# ----------------------------------------------------------------------------------------------
def ssd_quadratic(x, delta, A, B, C, D=None):
    """Masked-attention form: Y_t = sum_{s<=t} (C_t . B_s) L_ts delta_s x_s + D delta_t x_t.

    Laid out for batched matmuls on contiguous (batch, heads, L, .) tensors (a strided einsum makes
    autograd copy per batch element); C . B once per group, shared by the group's heads; the skip
    D delta_t x_t is D on the diagonal of the (L, L) score matrix, not another pass over x.
    """
    _check_shapes(x, delta, A, B, C, D)
    batch, length, heads, _ = x.shape
    groups = B.shape[2]
    dtype = _compute_dtype(x)
    deltaf = delta.to(dtype)
    Bg = B.to(dtype).transpose(1, 2).contiguous()  # (b, g, s, n)
    Cg = C.to(dtype).transpose(1, 2).contiguous()  # (b, g, t, n)
    decay_mask = torch.exp(segment_sum(deltaf.transpose(1, 2) * A.to(dtype)[:, None]))  # (b, h, t, s)
    scores = (Cg @ Bg.transpose(-1, -2))[:, :, None] * decay_mask.view(batch, groups, heads // groups, length, length)
    scores = scores.view(batch, heads, length, length)
    if D is not None:
        scores = scores + torch.diag_embed(D.to(dtype)[:, None].expand(heads, length))
    x_in = (x.to(dtype) * deltaf[..., None]).transpose(1, 2).contiguous()  # (b, h, s, p)
    return (scores @ x_in).transpose(1, 2).to(x.dtype)


def ssd_chunked(x, delta, A, B, C, D=None, chunk_size=32):
    """Chunked form: quadratic inside each chunk, the recurrence carried between chunks.

    Cost O(L * chunk_size) per head. A length that is not a multiple of chunk_size is padded at the end
    with delta = 0 (no decay, no input); the scan is causal, so real outputs are unaffected.
    """
    _check_shapes(x, delta, A, B, C, D)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be >= 1, got {chunk_size}")
    batch, length, heads, head_dim = x.shape
    pad = (-length) % chunk_size
    dtype = _compute_dtype(x)
    xf, deltaf = x.to(dtype), delta.to(dtype)
    Bh, Ch = _groups_to_heads(B.to(dtype), heads), _groups_to_heads(C.to(dtype), heads)
    if pad:
        xf, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bh, Ch))
        deltaf = F.pad(deltaf, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    def split(t):  # (b, L, h, ...) -> (b, chunks, h, chunk_size, ...): every step below is a batched matmul
        return t.reshape(batch, chunks, chunk_size, heads, -1).transpose(2, 3)

    x_in = split(xf * deltaf[..., None])  # (b, c, h, l, p)
    Bc, Cc = split(Bh), split(Ch)  # (b, c, h, l, n)
    log_decay = split(deltaf * A.to(dtype)).squeeze(-1)  # (b, c, h, l)
    log_decay_cum = log_decay.cumsum(dim=-1)

    # Within a chunk: the quadratic form. The decay mask comes from differences of the within-chunk
    # cumulative sum (as mamba-ssm's chunk kernel does): at most chunk_size terms, so no cancellation
    # worth the cost of segment_sum's masked cumsum over (t, s).
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    log_intra = log_decay_cum[..., :, None] - log_decay_cum[..., None, :]
    intra_mask = torch.exp(log_intra.masked_fill(~causal, float("-inf")))  # (b, c, h, t, s)
    y = ((Cc @ Bc.transpose(-1, -2)) * intra_mask) @ x_in  # (b, c, h, l, p)

    # State each chunk leaves behind, from its own inputs only (decayed to the chunk's end).
    to_chunk_end = torch.exp(log_decay_cum[..., -1:] - log_decay_cum)  # (b, c, h, l)
    chunk_states = (Bc * to_chunk_end[..., None]).transpose(-1, -2) @ x_in  # (b, c, h, n, p)
    chunk_decay = torch.exp(log_decay_cum[..., -1])  # (b, c, h): total decay across a chunk

    # Between chunks: the recurrence, one step per chunk (state entering chunk c).
    # (unbind once: indexing inside the loop would make autograd build a full-size zero gradient per step)
    states, decays = chunk_states.unbind(dim=1), chunk_decay.unbind(dim=1)
    entering = [torch.zeros_like(states[0])]
    for c in range(1, chunks):
        entering.append(decays[c - 1][..., None, None] * entering[-1] + states[c - 1])
    entering = torch.stack(entering, dim=1)  # (b, c, h, n, p)

    # Contribution of the entering state to each position: C_t . (decay from chunk start to t) h.
    from_chunk_start = torch.exp(log_decay_cum)  # (b, c, h, l)
    y = y + (Cc * from_chunk_start[..., None]) @ entering

    y = y.transpose(2, 3).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return _skip(y, x, delta, D).to(x.dtype)


def ssd_mamba_kernel(x, delta, A, B, C, D=None, chunk_size=32):
    """mamba-ssm's fused kernel, called with D=None (its skip is D * x) and our D * delta * x added."""
    kernel = mamba_chunk_scan_kernel()
    if kernel is None or not x.is_cuda:
        raise RuntimeError(
            "ssd_impl=mamba_ssm needs CUDA tensors and the mamba-ssm package (pip install 'recbole-mm[cuda]'); "
            "use ssd_impl: auto or torch_chunked otherwise"
        ) from mamba_import_error()
    _check_shapes(x, delta, A, B, C, D)
    y = kernel(
        x.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
        chunk_size=chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
    )
    return _skip(y, x, delta, D).to(x.dtype)


def resolve_ssd_impl(impl, x):
    """auto -> mamba_ssm for CUDA tensors when the kernel imports, torch_chunked otherwise."""
    if impl not in SSD_IMPLS:
        raise ValueError(f"ssd_impl must be one of {SSD_IMPLS}, got {impl!r} (set it in the model yaml)")
    if impl == "auto":
        if not x.is_cuda:
            return "torch_chunked"
        if mamba_chunk_scan_kernel() is None:
            _fall_back_on_cuda("mamba_ssm")
            return "torch_chunked"
        return "mamba_ssm"
    return impl


def ssd(x, delta, A, B, C, D=None, chunk_size=32, impl="auto"):
    """SSD scan with the implementation chosen by ``impl`` (see ``SSD_IMPLS``)."""
    impl = resolve_ssd_impl(impl, x)
    if impl == "torch_quadratic":
        return ssd_quadratic(x, delta, A, B, C, D)
    if impl == "torch_chunked":
        if x.shape[1] <= chunk_size:  # a single chunk is exactly the quadratic form, without the padding
            return ssd_quadratic(x, delta, A, B, C, D)
        return ssd_chunked(x, delta, A, B, C, D, chunk_size=chunk_size)
    return ssd_mamba_kernel(x, delta, A, B, C, D, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# Companion layers: gated RMSNorm and causal depthwise convolution.
# ----------------------------------------------------------------------------------------------
class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight: Mamba-2's output norm with the gate applied before the norm."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        gated = (y * F.silu(z)).float()
        normed = gated * torch.rsqrt(gated.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(y.dtype)


class _ShiftedCausalConv(torch.autograd.Function):
    """Causal depthwise conv as ``width`` shifted multiply-adds over a (batch, L, channels) tensor.

    Same sum as ``F.conv1d`` on the left-padded input; one pass per tap over contiguous memory instead
    of oneDNN's depthwise kernel, whose single-thread backward is the slowest op of a MMM4Rec step.
    Saves only the padded input for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        length, width = x.shape[1], weight.shape[-1]
        padded = F.pad(x, (0, 0, width - 1, 0))  # (b, L + width - 1, c), contiguous
        out = torch.mul(padded[:, width - 1:], weight[:, width - 1])
        if bias is not None:
            out += bias
        for tap in range(width - 1):
            out.addcmul_(padded[:, tap:tap + length], weight[:, tap])
        ctx.save_for_backward(padded, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        padded, weight = ctx.saved_tensors
        length, width = grad.shape[1], weight.shape[-1]
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # out[t] reads x[t - (width - 1) + tap]: x[s] collects grad[s + width - 1 - tap] * weight[tap].
            grad_padded = F.pad(grad, (0, 0, 0, width - 1))
            grad_x = torch.mul(grad_padded[:, :length], weight[:, width - 1])
            for tap in range(width - 1):
                shift = width - 1 - tap
                grad_x.addcmul_(grad_padded[:, shift:shift + length], weight[:, tap])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.stack(
                [(grad * padded[:, tap:tap + length]).sum(dim=(0, 1)) for tap in range(width)], dim=-1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 1))
        return grad_x, grad_weight, grad_bias


def causal_conv1d_kernel_supports(x, width):
    """causal-conv1d's kernel takes widths 2..4 and fp32/fp16/bf16 CUDA tensors; the rest stays in torch."""
    return x.is_cuda and 2 <= width <= 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def causal_depthwise_conv1d(x, weight, bias=None, activation=None, impl="auto", channels_last=False):
    """Depthwise conv over time seeing only the past: x (batch, channels, L), weight (channels, k).

    out[:, c, t] = act( sum_j weight[c, j] * x[:, c, t - (k - 1) + j] + bias[c] ), x before 0 read as 0.
    ``channels_last``: x and the output are (batch, L, channels) instead (no transposes around a
    projection's output).
    impl: ``torch`` (F.conv1d, the reference) | ``shifted`` (one multiply-add per tap, fast on CPU) |
    ``causal_conv1d`` (CUDA kernel) | ``auto`` (the kernel where it imports and supports the width and
    dtype, else ``shifted``).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_depthwise_conv1d: activation must be None or 'silu', got {activation!r}")
    width = weight.shape[-1]
    if impl == "auto":
        impl = "shifted"
        if causal_conv1d_kernel_supports(x, width):
            if causal_conv1d_kernel() is not None:
                impl = "causal_conv1d"
            else:
                _fall_back_on_cuda("causal_conv1d")
    if impl == "causal_conv1d":
        kernel = causal_conv1d_kernel()
        if kernel is None or not causal_conv1d_kernel_supports(x, width):
            raise RuntimeError(
                "conv impl causal_conv1d needs the causal-conv1d package and CUDA tensors of dtype fp32/fp16/bf16 "
                f"with width 2..4 (got {x.device.type} {x.dtype}, width {width}); use conv_impl: auto"
            ) from causal_conv1d_import_error()
        channels_first = x.transpose(1, 2) if channels_last else x
        # The kernel reads channel-last strides natively; any other layout goes contiguous.
        if not (channels_last and channels_first.stride(1) == 1):
            channels_first = channels_first.contiguous()
        out = kernel(channels_first, weight.contiguous(), bias, activation=activation)
        return out.transpose(1, 2) if channels_last else out
    if impl == "shifted":
        out = _ShiftedCausalConv.apply(x if channels_last else x.transpose(1, 2), weight, bias)
        out = out if channels_last else out.transpose(1, 2)
    else:
        channels_first = x.transpose(1, 2) if channels_last else x
        out = F.conv1d(F.pad(channels_first, (width - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
        out = out.transpose(1, 2) if channels_last else out
    return F.silu(out) if activation == "silu" else out


class CausalDepthwiseConv1d(nn.Module):
    """Module form of ``causal_depthwise_conv1d`` on (batch, channels, L) or, with ``channels_last``,
    (batch, L, channels); nn.Conv1d's default init."""

    def __init__(self, channels, kernel_size, bias=True, activation="silu", impl="auto", channels_last=False):
        super().__init__()
        reference = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)
        self.weight = nn.Parameter(reference.weight.detach().squeeze(1).clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if bias else None
        self.activation = activation
        self.impl = impl
        self.channels_last = channels_last

    def forward(self, x):
        return causal_depthwise_conv1d(x, self.weight, self.bias, self.activation, self.impl, self.channels_last)
