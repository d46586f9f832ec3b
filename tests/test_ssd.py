"""The SSD core: every implementation equals the naive recurrence; causality; companion layers.

GPU tests (mamba-ssm / causal-conv1d kernels) run on CUDA machines; a kernel package that is installed
but does not import fails them, and RECBOLE_MM_REQUIRE_KERNELS=1 also fails them where CUDA or the
kernels are absent (set by benchmarks/gpu_check.sh).
"""
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.layers import ssd as ssd_mod
from recbole_mm.model.layers.ssd import (
    GatedRMSNorm,
    causal_depthwise_conv1d,
    discretization_step,
    ssd,
    ssd_chunked,
    ssd_naive,
    ssd_quadratic,
    CausalDepthwiseConv1d,
)


def random_inputs(length, batch=2, heads=4, head_dim=3, groups=2, d_state=5, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=torch.float64)
    delta = discretization_step(torch.randn(batch, length, heads, generator=gen, dtype=torch.float64) - 1.0)
    A = -torch.empty(heads, dtype=torch.float64).uniform_(1, 16, generator=gen)
    B = torch.randn(batch, length, groups, d_state, generator=gen, dtype=torch.float64)
    C = torch.randn(batch, length, groups, d_state, generator=gen, dtype=torch.float64)
    D = torch.randn(heads, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (x, delta, A, B, C, D)]


def textbook_recurrence(x, delta, A, B, C, D):
    """Scalar loops straight from the definition (independent of ssd_naive's tensor code)."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    y = torch.zeros_like(x)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            state = torch.zeros(head_dim, d_state, dtype=x.dtype)
            for t in range(length):
                state = torch.exp(delta[b, t, h] * A[h]) * state + delta[b, t, h] * torch.outer(x[b, t, h], B[b, t, g])
                y[b, t, h] = state @ C[b, t, g]
                if D is not None:
                    y[b, t, h] += D[h] * delta[b, t, h] * x[b, t, h]
    return y


@pytest.mark.parametrize("use_D", [False, True])
def test_naive_matches_textbook_loops(use_D):
    x, delta, A, B, C, D = random_inputs(7)
    D = D if use_D else None
    torch.testing.assert_close(ssd_naive(x, delta, A, B, C, D).double(), textbook_recurrence(x, delta, A, B, C, D),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 5, 8, 13, 20, 37, 64])
@pytest.mark.parametrize("use_D", [False, True])
@pytest.mark.parametrize("impl", ["quadratic", "chunked"])
def test_fast_paths_equal_naive(length, use_D, impl):
    x, delta, A, B, C, D = random_inputs(length, seed=length)
    D = D if use_D else None
    expected = ssd_naive(x, delta, A, B, C, D)
    if impl == "quadratic":
        got = ssd_quadratic(x, delta, A, B, C, D)
    else:
        got = ssd_chunked(x, delta, A, B, C, D, chunk_size=8)  # 8: lengths above hit 0, 1, 2+ partial chunks
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_dispatcher_paths_equal_naive_in_float32():
    x, delta, A, B, C, D = (t.float() for t in random_inputs(29, heads=8, groups=8, seed=3))
    expected = ssd_naive(x, delta, A, B, C, D)
    for impl in ("auto", "torch_quadratic", "torch_chunked"):
        for chunk_size in (8, 32):  # several chunks; one chunk (the quadratic shortcut)
            got = ssd(x, delta, A, B, C, D, chunk_size=chunk_size, impl=impl)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_chunked_equals_quadratic_at_length_200():
    x, delta, A, B, C, D = random_inputs(200, heads=8, head_dim=4, groups=4, d_state=8, seed=200)
    quadratic = ssd_quadratic(x, delta, A, B, C, D)
    for chunk_size in (1, 32, 64, 200, 256):
        torch.testing.assert_close(ssd_chunked(x, delta, A, B, C, D, chunk_size=chunk_size), quadratic,
                                   rtol=1e-6, atol=1e-6)


def ssd_quadratic_before_speedup(x, delta, A, B, C, D=None):
    """ssd_quadratic before the CPU speed work: einsums over repeated groups, the skip added after."""
    heads = x.shape[2]
    Bh, Ch = B.repeat_interleave(heads // B.shape[2], dim=2), C.repeat_interleave(heads // C.shape[2], dim=2)
    decay_mask = torch.exp(ssd_mod.segment_sum((delta * A).transpose(1, 2)))
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * decay_mask
    y = torch.einsum("bhts,bshp->bthp", scores, x * delta[..., None])
    return y if D is None else y + D[:, None] * delta[..., None] * x


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("use_D", [False, True])
def test_quadratic_outputs_and_gradients_equal_the_pre_speedup_form(groups, use_D):
    inputs = random_inputs(20, heads=4, groups=groups, seed=groups)
    if not use_D:
        inputs[-1] = None
    results = []
    for fn in (ssd_quadratic, ssd_quadratic_before_speedup):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
        out = fn(*leaves)
        (out * torch.cos(out)).sum().backward()
        results.append((out, [t.grad for t in leaves if t is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for got, expected in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradients_agree_between_paths():
    inputs = random_inputs(19, seed=19)
    grads = []
    for fn in (ssd_naive, ssd_quadratic, lambda *a: ssd_chunked(*a, chunk_size=4)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for g_ref, g in zip(grads[0], other):
            torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["naive", "torch_quadratic", "torch_chunked"])
def test_outputs_are_causal(impl):
    length, cut = 23, 11
    x, delta, A, B, C, D = random_inputs(length, seed=5)
    run = (lambda *a: ssd_naive(*a)) if impl == "naive" else (lambda *a: ssd(*a, chunk_size=4, impl=impl))
    before = run(x, delta, A, B, C, D)
    x2, delta2, B2, C2 = x.clone(), delta.clone(), B.clone(), C.clone()
    x2[:, cut + 1:] = torch.randn_like(x2[:, cut + 1:])
    delta2[:, cut + 1:] = delta2[:, cut + 1:] * 3 + 0.5
    B2[:, cut + 1:] = -B2[:, cut + 1:]
    C2[:, cut + 1:] = 2 * C2[:, cut + 1:]
    after = run(x2, delta2, A, B2, C2, D)
    torch.testing.assert_close(after[:, :cut + 1], before[:, :cut + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, cut + 1:], before[:, cut + 1:])


def test_bad_arguments_raise_clear_errors():
    x, delta, A, B, C, D = random_inputs(6)
    with pytest.raises(ValueError, match="ssd_impl must be one of"):
        ssd(x, delta, A, B, C, D, impl="triton")
    with pytest.raises(ValueError, match="delta must be"):
        ssd_quadratic(x, delta[:, :-1], A, B, C, D)
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd_quadratic(x, delta, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1), D)


def test_mamba_kernel_request_on_cpu_raises():
    x, delta, A, B, C, D = random_inputs(6)
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        ssd(x, delta, A, B, C, D, impl="mamba_ssm")


def test_causal_conv_matches_direct_sum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for t in range(9):
        for j in range(4):
            source = t - 3 + j
            if source >= 0:
                expected[:, :, t] += weight[:, j] * x[:, :, source]
    expected = F.silu(expected + bias[:, None])
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, bias, "silu", impl="torch"), expected)


def conv1d_reference(x, weight, bias, activation):
    """The F.conv1d form (the implementation before the shifted one), channels first."""
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("width", [1, 2, 4, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_shifted_conv_outputs_and_gradients_equal_conv1d(width, channels_last, use_bias):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(3, 6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, width, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if use_bias else None
    leaves = [t for t in (x, weight, bias) if t is not None]
    results = []
    for impl in ("shifted", "reference"):
        if impl == "reference":
            out = conv1d_reference(x, weight, bias, "silu")
        else:
            given = x.transpose(1, 2) if channels_last else x  # a strided view, as a projection's slice
            out = causal_depthwise_conv1d(given, weight, bias, "silu", impl=impl, channels_last=channels_last)
            out = out.transpose(1, 2) if channels_last else out
        results.append((out, torch.autograd.grad((out * torch.cos(out)).sum(), leaves)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for got, expected in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_conv_auto_on_cpu_is_shifted_and_kernel_limits_are_respected():
    x = torch.randn(2, 3, 9)
    weight = torch.randn(3, 4)
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, None, None, impl="auto"),
                               causal_depthwise_conv1d(x, weight, None, None, impl="torch"))
    assert not ssd_mod.causal_conv1d_kernel_supports(x, 4)  # CPU tensors never go to the kernel
    with pytest.raises(RuntimeError, match="width 2..4"):
        causal_depthwise_conv1d(x, weight, impl="causal_conv1d")
    with pytest.raises(ValueError, match="conv impl must be one of"):
        causal_depthwise_conv1d(x, weight, impl="cudnn")


def fake_failed_import(monkeypatch, error):
    monkeypatch.setattr(ssd_mod, "_import_kernel", lambda package: (None, error))
    monkeypatch.setattr(ssd_mod, "kernel_package_installed", lambda package: True)
    fallback = ssd_mod._fall_back_on_cuda.__wrapped__  # uncached: every call decides afresh
    monkeypatch.setattr(ssd_mod, "_fall_back_on_cuda", fallback)
    return fallback


def test_failed_kernel_import_is_kept_logged_and_chained(monkeypatch, caplog):
    error = ImportError("selective_scan_cuda: undefined symbol")
    fallback = fake_failed_import(monkeypatch, error)
    monkeypatch.delenv(ssd_mod.REQUIRE_KERNELS_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=ssd_mod.__name__):
        fallback("mamba_ssm")
    assert "installed but does not import" in caplog.text and "undefined symbol" in caplog.text
    x, delta, A, B, C, D = random_inputs(6)
    with pytest.raises(RuntimeError, match="mamba-ssm") as raised:
        ssd(x, delta, A, B, C, D, impl="mamba_ssm")
    assert raised.value.__cause__ is error
    monkeypatch.setenv(ssd_mod.REQUIRE_KERNELS_ENV, "1")
    with pytest.raises(RuntimeError, match="RECBOLE_MM_REQUIRE_KERNELS=1") as raised:
        fallback("mamba_ssm")
    assert raised.value.__cause__ is error


def test_gated_rmsnorm_matches_formula():
    gen = torch.Generator().manual_seed(2)
    y, z = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    norm = GatedRMSNorm(6, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    gated = y * z * torch.sigmoid(z)
    expected = gated / gated.pow(2).mean(-1, keepdim=True).sqrt() * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(y, z), expected, rtol=1e-5, atol=1e-6)


def kernel_or_skip(package):
    """The kernel function on CUDA. Skip where CUDA or the package is absent; fail where the package is
    installed but does not import (a broken build must not look green) or under RECBOLE_MM_REQUIRE_KERNELS=1."""
    required = os.environ.get(ssd_mod.REQUIRE_KERNELS_ENV) == "1"
    if not torch.cuda.is_available():
        if required:
            pytest.fail(f"{ssd_mod.REQUIRE_KERNELS_ENV}=1 but CUDA is not available")
        pytest.skip("needs CUDA")
    function, error = ssd_mod._import_kernel(package)
    if function is None:
        if required or ssd_mod.kernel_package_installed(package):
            pytest.fail(f"{package} does not import: {error!r}")
        pytest.skip(f"needs {package}")
    return function


def assert_close_relative_to_max(got, expected, fraction):
    """|got - expected| <= fraction * max|expected|: fp32 Triton dots run in TF32 (10-bit mantissa)."""
    scale = expected.abs().max().clamp(min=1e-6)
    error = (got.float() - expected.float()).abs().max()
    assert error <= fraction * scale, f"max error {error:.3g} > {fraction} * max |expected| {scale:.3g}"


@pytest.mark.parametrize("length", [20, 37, 200])
@pytest.mark.parametrize("use_D", [False, True])
@pytest.mark.parametrize("groups", [8, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_kernel_equals_torch_path_outputs_and_gradients(length, use_D, groups, dtype):
    kernel_or_skip("mamba_ssm")
    x, delta, A, B, C, D = (t.float() for t in random_inputs(length, heads=8, head_dim=16, groups=groups,
                                                              d_state=16, seed=length, device="cuda"))
    assert ssd_mod.resolve_ssd_impl("auto", x) == "mamba_ssm"
    D = D if use_D else None
    inputs = [t.to(dtype) for t in (x, delta, B, C)]
    results = []
    for impl in ("mamba_ssm", "torch_chunked"):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        xi, deltai, Bi, Ci = leaves
        out = ssd(xi, deltai, A, Bi, Ci, D, chunk_size=32, impl=impl)
        out.float().pow(2).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    fraction = 2e-2 if dtype == torch.float32 else 6e-2
    assert_close_relative_to_max(results[0][0], results[1][0], fraction)
    for got, expected in zip(results[0][1], results[1][1]):
        assert_close_relative_to_max(got, expected, fraction)


@pytest.mark.skipif(not (torch.cuda.is_available() and ssd_mod.causal_conv1d_kernel() is not None),
                    reason="needs CUDA and causal-conv1d")
def test_causal_conv1d_kernel_equals_torch_path():
    x = torch.randn(2, 16, 20, device="cuda")
    weight, bias = torch.randn(16, 4, device="cuda"), torch.randn(16, device="cuda")
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, bias, "silu", impl="causal_conv1d"),
                               causal_depthwise_conv1d(x, weight, bias, "silu", impl="torch"), rtol=1e-3, atol=1e-3)


def test_gated_rmsnorm_eps_sits_inside_the_root_and_dtype_is_kept():
    gen = torch.Generator().manual_seed(3)
    y, z = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    norm = GatedRMSNorm(6, eps=0.5).double()
    gated = y * z * torch.sigmoid(z)
    torch.testing.assert_close(norm(y, z), gated / (gated.pow(2).mean(-1, keepdim=True) + 0.5).sqrt())
    assert torch.equal(GatedRMSNorm(6)(torch.zeros(4, 6), z.float()), torch.zeros(4, 6))  # eps keeps 0 finite
    half = GatedRMSNorm(6)(y.bfloat16(), z.bfloat16())
    assert half.dtype == torch.bfloat16


def direct_causal_conv(x, weight, bias):
    """out[:, c, t] = sum_j weight[c, j] x[:, c, t - (k - 1) + j] + bias[c], x before 0 read as 0."""
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[2]):
        for j in range(width):
            if t - (width - 1) + j >= 0:
                out[:, :, t] += weight[:, j] * x[:, :, t - (width - 1) + j]
    return out if bias is None else out + bias[:, None]


def test_causal_conv_without_activation_and_auto_on_cpu():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    expected = direct_causal_conv(x, weight, None)
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight), expected)
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, None, "silu", impl="auto"), F.silu(expected))


def test_causal_conv_rejects_unknown_options_and_the_kernel_on_cpu():
    x, weight = torch.randn(1, 2, 5), torch.randn(2, 3)
    with pytest.raises(ValueError, match="conv impl must be one of"):
        causal_depthwise_conv1d(x, weight, impl="cudnn")
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_depthwise_conv1d(x, weight, activation="relu")
    with pytest.raises(RuntimeError, match="causal-conv1d package"):
        causal_depthwise_conv1d(x, weight, impl="causal_conv1d")


@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_module_uses_conv1d_init_and_the_direct_sum(bias):
    torch.manual_seed(5)
    reference = torch.nn.Conv1d(4, 4, 3, groups=4, bias=bias)
    torch.manual_seed(5)
    module = CausalDepthwiseConv1d(4, 3, bias=bias)
    assert module.impl == "auto" and module.activation == "silu"
    torch.testing.assert_close(module.weight, reference.weight.squeeze(1))
    assert (module.bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(module.bias, reference.bias)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        expected = F.silu(direct_causal_conv(x, module.weight, module.bias))
        torch.testing.assert_close(module(x), expected)
        plain = CausalDepthwiseConv1d(4, 3, bias=bias, activation=None)
        torch.testing.assert_close(plain(x), direct_causal_conv(x, plain.weight, plain.bias))
def test_causal_conv_module_defaults_and_channels_last_form():
    """A bias by default; channels_last=True takes and returns (batch, L, channels)."""
    module = CausalDepthwiseConv1d(4, 3)
    assert module.bias is not None and module.channels_last is False
    last = CausalDepthwiseConv1d(4, 3, channels_last=True)
    x = torch.randn(2, 6, 4)  # (batch, L, channels)
    with torch.no_grad():
        expected = F.silu(direct_causal_conv(x.transpose(1, 2), last.weight, last.bias)).transpose(1, 2)
        torch.testing.assert_close(last(x), expected)


def test_gated_rmsnorm_default_eps_is_1e_minus_6():
    y, z = torch.full((1, 4), 1e-3, dtype=torch.float64), torch.full((1, 4), 2.0, dtype=torch.float64)
    gated = y * z * torch.sigmoid(z)
    expected = gated / torch.sqrt(gated.pow(2).mean() + 1e-6)
    torch.testing.assert_close(GatedRMSNorm(4).double()(y, z), expected)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_kernel_equals_torch_path_outputs_and_gradients(width, dtype):
    kernel_or_skip("causal_conv1d")
    x = torch.randn(2, 20, 16, device="cuda", dtype=dtype)
    weight, bias = torch.randn(16, width, device="cuda", dtype=dtype), torch.randn(16, device="cuda", dtype=dtype)
    assert ssd_mod.causal_conv1d_kernel_supports(x, width)
    results = []
    for impl in ("causal_conv1d", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = causal_depthwise_conv1d(leaves[0], leaves[1], leaves[2], "silu", impl=impl, channels_last=True)
        out.float().pow(2).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    fraction = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_relative_to_max(results[0][0], results[1][0], fraction)
    for got, expected in zip(results[0][1], results[1][1]):
        assert_close_relative_to_max(got, expected, fraction)


def test_conv_auto_on_cuda_keeps_unsupported_widths_in_torch():
    kernel_or_skip("causal_conv1d")
    x = torch.randn(2, 20, 16, device="cuda")
    weight = torch.randn(16, 5, device="cuda")
    assert not ssd_mod.causal_conv1d_kernel_supports(x, 5)
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, impl="auto", channels_last=True),
                               causal_depthwise_conv1d(x, weight, impl="torch", channels_last=True))


def test_discretization_step_adds_the_bias_before_softplus():
    """delta = softplus(dt + dt_bias) = log(1 + exp(dt + dt_bias)), written out."""
    dt = torch.tensor([[-3.0, 0.0, 2.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(discretization_step(dt, bias), torch.log1p(torch.exp(dt + bias)))
    torch.testing.assert_close(discretization_step(dt), torch.log1p(torch.exp(dt)))


def test_shape_errors_name_the_argument_and_both_shapes():
    x, delta, A, B, C, D = random_inputs(6)  # batch 2, L 6, heads 4, head_dim 3, groups 2, d_state 5
    for fn in (ssd_naive, ssd_quadratic, ssd_chunked):
        with pytest.raises(ValueError, match=r"^ssd: x must be \(batch, L, heads, head_dim\), got \(2, 6, 4\)$"):
            fn(x[..., 0], delta, A, B, C, D)
        with pytest.raises(ValueError, match=r"^ssd: A must be \(4,\), got \(3,\)$"):
            fn(x, delta, A[:3], B, C, D)
        with pytest.raises(ValueError, match=r"^ssd: B and C must be \(batch, L, groups, d_state\), got \(2, 6, 2, 5\), \(2, 6, 2, 4\)$"):
            fn(x, delta, A, B, C[..., :4], D)
        with pytest.raises(ValueError, match=r"got \(2, 6, 10\), \(2, 6, 10\)$"):  # 3-d B and C
            fn(x, delta, A, B.flatten(2), C.flatten(2), D)
        with pytest.raises(ValueError, match=r"got \(2, 5, 2, 5\), \(2, 5, 2, 5\)$"):  # wrong length
            fn(x, delta, A, B[:, :5], C[:, :5], D)
        with pytest.raises(ValueError, match=r"^ssd: heads \(4\) must be divisible by groups \(3\)$"):
            fn(x, delta, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1), D)
        with pytest.raises(ValueError, match=r"^ssd: D must be \(4,\) or None, got \(2,\)$"):
            fn(x, delta, A, B, C, D[:2])
    with pytest.raises(ValueError, match=r"^ssd: chunk_size must be >= 1, got 0$"):
        ssd_chunked(x, delta, A, B, C, D, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    """Every torch path computes in float32 for float32/bfloat16 inputs (exp of segment sums) and returns
    the input's dtype; the result is the float64 recurrence rounded once."""
    inputs64 = random_inputs(40, groups=1, d_state=5)
    expected = textbook_recurrence(*inputs64)
    low = [t.to(dtype) for t in inputs64]
    reference = textbook_recurrence(*[t.double() for t in low])  # the rounded inputs, exact arithmetic
    # bfloat16: float32 arithmetic rounds once at the end (computing in bfloat16 is off by ~5e-3 of the scale)
    tolerance = 2e-5 if dtype == torch.float32 else 1e-3
    rounded_once = reference.to(dtype).double()
    for fn in (ssd_naive, ssd_quadratic, lambda *a: ssd_chunked(*a, chunk_size=16), ssd):
        out = fn(*low)
        assert out.dtype == dtype
        scale = reference.abs().max()
        assert ((out.double() - rounded_once).abs().max() / scale) < tolerance
    assert expected.dtype == torch.float64


def test_auto_dispatch_on_cpu_and_the_default_chunk_size(monkeypatch):
    """On CPU, auto = torch_chunked; a sequence of at most one chunk (default 32) takes the quadratic form,
    a longer one the chunked path with the given chunk size."""
    calls = []
    monkeypatch.setattr(ssd_mod, "ssd_quadratic", lambda *a: calls.append(("quadratic", a[0].shape[1])) or a[0])
    monkeypatch.setattr(ssd_mod, "ssd_chunked",
                        lambda *a, chunk_size: calls.append(("chunked", a[0].shape[1], chunk_size)) or a[0])
    for length in (32, 33):
        x, delta, A, B, C, D = random_inputs(length)
        assert ssd_mod.ssd(x, delta, A, B, C, D) is x
    x, delta, A, B, C, D = random_inputs(9)
    ssd_mod.ssd(x, delta, A, B, C, D, chunk_size=8)
    ssd_mod.ssd(x, delta, A, B, C, D, chunk_size=9)
    assert calls == [("quadratic", 32), ("chunked", 33, 32), ("chunked", 9, 8), ("quadratic", 9)]
    assert ssd_mod.resolve_ssd_impl("auto", x) == "torch_chunked"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_dispatch_hands_the_kernel_channel_first_tensors_and_restores_the_layout(
        monkeypatch, channels_last, activation, use_bias):
    """The causal-conv1d branch on CPU, with the kernel replaced by the direct sum under the kernel's own
    contract (x (batch, channels, L) with channel-last or contiguous strides, contiguous weight (channels,
    width), activation by keyword): what reaches it and how its output comes back."""
    calls = []

    def fake_kernel(x, weight, bias, activation=None):
        assert x.dim() == 3 and x.shape[1] == weight.shape[0] and (x.is_contiguous() or x.stride(1) == 1)
        assert weight.is_contiguous() and weight.dim() == 2
        calls.append(activation)
        out = direct_causal_conv(x, weight, bias)
        return F.silu(out) if activation == "silu" else out

    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel", lambda: fake_kernel)
    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel_supports", lambda x, width: x.dim() == 3 and 2 <= width <= 4)
    gen = torch.Generator().manual_seed(7)
    channels_first = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64).t()  # (5, 3), not contiguous
    bias = torch.randn(5, generator=gen, dtype=torch.float64) if use_bias else None
    expected = direct_causal_conv(channels_first, weight, bias)
    expected = F.silu(expected) if activation == "silu" else expected
    x = channels_first.transpose(1, 2) if channels_last else channels_first
    for impl in ("causal_conv1d", "auto"):
        out = causal_depthwise_conv1d(x, weight, bias, activation, impl=impl, channels_last=channels_last)
        torch.testing.assert_close(out.transpose(1, 2) if channels_last else out, expected)
        assert out.shape == x.shape
    assert calls == [activation, activation]  # auto chose the kernel where it "supports" the input
    # a width the kernel refuses stays in torch under auto and is refused by name when asked for
    wide = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(causal_depthwise_conv1d(channels_first, wide, None, impl="auto"),
                               direct_causal_conv(channels_first, wide, None))
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match=r"^conv impl causal_conv1d needs the causal-conv1d package and CUDA tensors "
                                           r"of dtype fp32/fp16/bf16 with width 2..4 \(got cpu torch.float64, width 6\); "
                                           r"use conv_impl: auto$"):
        causal_depthwise_conv1d(channels_first, wide, impl="causal_conv1d")


def test_conv_kernel_reads_a_channels_last_input_in_place_and_gets_other_layouts_contiguous(monkeypatch):
    received = []
    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel", lambda: lambda x, weight, bias, activation=None:
                        received.append(x) or direct_causal_conv(x, weight, bias))
    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel_supports", lambda x, width: True)
    weight = torch.randn(4, 3, dtype=torch.float64)
    channels_last = torch.randn(2, 6, 4, dtype=torch.float64)  # a projection's (batch, L, channels) output
    causal_depthwise_conv1d(channels_last, weight, impl="causal_conv1d", channels_last=True)
    assert received[-1].data_ptr() == channels_last.data_ptr() and received[-1].stride(1) == 1  # no copy
    strided = torch.randn(2, 4, 12, dtype=torch.float64)[:, :, ::2]  # (batch, channels, L), every other step
    out = causal_depthwise_conv1d(strided, weight, impl="causal_conv1d")
    assert received[-1].is_contiguous()
    torch.testing.assert_close(out, direct_causal_conv(strided, weight, None))


def test_torch_conv_impl_in_the_channels_last_layout():
    gen = torch.Generator().manual_seed(9)
    x, weight = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    out = causal_depthwise_conv1d(x, weight, bias, "silu", impl="torch", channels_last=True)
    torch.testing.assert_close(out, F.silu(direct_causal_conv(x.transpose(1, 2), weight, bias)).transpose(1, 2))


def test_segment_sum_over_any_leading_dimensions_equals_the_loop():
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = ssd_mod.segment_sum(a)
    assert out.shape == (2, 3, 4, 5, 5)
    for t in range(5):
        for s_ in range(5):
            expected = a[..., s_ + 1:t + 1].sum(-1) if t >= s_ else torch.full(a.shape[:-1], float("-inf"), dtype=a.dtype)
            torch.testing.assert_close(out[..., t, s_], expected)


def test_conv_auto_falls_back_to_torch_when_the_kernel_is_missing(monkeypatch):
    fallbacks = []
    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel", lambda: None)
    monkeypatch.setattr(ssd_mod, "causal_conv1d_kernel_supports", lambda x, width: True)
    monkeypatch.setattr(ssd_mod, "_fall_back_on_cuda", fallbacks.append)
    x, weight = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(causal_depthwise_conv1d(x, weight, None, impl="auto"), direct_causal_conv(x, weight, None))
    assert fallbacks == ["causal_conv1d"]


def test_conv_impl_names_pick_their_implementation_on_cpu():
    """auto and shifted run the shifted multiply-adds (its own backward), torch runs F.conv1d; each in
    the layout whose output it returns untransposed."""
    x = torch.randn(2, 6, 3, requires_grad=True)
    weight = torch.randn(3, 4)

    def op_name(impl, channels_last):
        out = causal_depthwise_conv1d(x if channels_last else x.transpose(1, 2), weight, impl=impl,
                                      channels_last=channels_last)
        return type(out.grad_fn).__name__

    assert "ShiftedCausalConv" in op_name("shifted", True) and op_name("auto", True) == op_name("shifted", True)
    assert "Convolution" in op_name("torch", False)


def test_kernels_are_imported_from_the_names_their_packages_publish(monkeypatch):
    """mamba-ssm's mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined and causal-conv1d's
    causal_conv1d.causal_conv1d_fn, here as stand-in modules: each accessor returns its own package's
    function and no import error; an absent package is reported as such."""
    import sys
    import types

    scan, conv = object(), object()
    modules = {name: types.ModuleType(name) for name in
               ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined", "causal_conv1d")}
    modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = scan
    modules["causal_conv1d"].causal_conv1d_fn = conv
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(ssd_mod, "_import_kernel", ssd_mod._import_kernel.__wrapped__)  # no cached answer
    assert ssd_mod.mamba_chunk_scan_kernel() is scan and ssd_mod.mamba_import_error() is None
    assert ssd_mod.causal_conv1d_kernel() is conv and ssd_mod.causal_conv1d_import_error() is None
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # importing it now raises ImportError
    assert ssd_mod.causal_conv1d_kernel() is None
    assert isinstance(ssd_mod.causal_conv1d_import_error(), ImportError)
    assert ssd_mod.mamba_chunk_scan_kernel() is scan and ssd_mod.mamba_import_error() is None  # each its own
    assert ssd_mod.kernel_package_installed("torch") and not ssd_mod.kernel_package_installed("no_such_kernel_pkg")


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, to run the CUDA-only glue with a stand-in kernel."""

    @property
    def is_cuda(self):
        return True


def test_auto_resolution_on_cuda_takes_the_kernel_when_it_imports(monkeypatch, caplog):
    fallbacks = []
    monkeypatch.setattr(ssd_mod, "_fall_back_on_cuda", fallbacks.append)
    on_cuda = torch.zeros(1).as_subclass(_LooksLikeCuda)
    monkeypatch.setattr(ssd_mod, "mamba_chunk_scan_kernel", lambda: object())
    assert ssd_mod.resolve_ssd_impl("auto", on_cuda) == "mamba_ssm" and fallbacks == []
    monkeypatch.setattr(ssd_mod, "mamba_chunk_scan_kernel", lambda: None)
    assert ssd_mod.resolve_ssd_impl("auto", on_cuda) == "torch_chunked" and fallbacks == ["mamba_ssm"]
    with caplog.at_level(logging.WARNING):
        assert ssd_mod.resolve_ssd_impl("auto", torch.zeros(1)) == "torch_chunked"  # CPU: no fallback notice
    assert fallbacks == ["mamba_ssm"] and not caplog.records
    assert ssd_mod.resolve_ssd_impl("torch_quadratic", on_cuda) == "torch_quadratic"


@pytest.mark.parametrize("use_D", [False, True])
def test_mamba_kernel_glue_under_the_kernels_contract(monkeypatch, use_D):
    """ssd_mamba_kernel with mamba_chunk_scan_combined replaced by the naive scan under its contract
    (contiguous x, dt, float32 A, B, C; no D, z, dt_bias or softplus: the skip D * delta * x is added
    outside): equal to ssd_naive with the skip, in the input's dtype."""
    seen = {}

    def fake_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
        assert all(t.is_contiguous() for t in (x, dt, A, B, C)) and A.dtype == torch.float32
        seen.update(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return ssd_naive(*(t.as_subclass(torch.Tensor) for t in (x, dt, A.to(x.dtype), B, C)))

    monkeypatch.setattr(ssd_mod, "mamba_chunk_scan_kernel", lambda: fake_scan)
    x, delta, A, B, C, D = random_inputs(9)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    D = D if use_D else None
    out = ssd_mod.ssd(*(t.as_subclass(_LooksLikeCuda) for t in (x, delta, A, B, C)),
                      D if D is None else D.as_subclass(_LooksLikeCuda), chunk_size=16, impl="auto")
    torch.testing.assert_close(out.as_subclass(torch.Tensor), ssd_naive(x, delta, A, B, C, D))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert seen == {"chunk_size": 16, "D": None, "z": None, "dt_bias": None, "dt_softplus": False}
    with pytest.raises(ValueError, match="delta must be"):
        ssd_mod.ssd_mamba_kernel(x.as_subclass(_LooksLikeCuda), delta[:, :4], A, B, C, D)
    with pytest.raises(ValueError, match="D must be"):
        ssd_mod.ssd_mamba_kernel(*(t.as_subclass(_LooksLikeCuda) for t in (x, delta, A, B, C)), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"^ssd_impl=mamba_ssm needs CUDA tensors and the mamba-ssm package "
                                           r"\(pip install 'recbole-mm\[cuda\]'\); use ssd_impl: auto or torch_chunked otherwise$"):
        ssd_mod.ssd_mamba_kernel(x, delta, A, B, C, D)  # a plain CPU tensor


def test_causal_conv1d_kernel_takes_widths_2_to_4_in_fp32_fp16_bf16_on_cuda_only():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        on_cuda = torch.zeros(1, 2, 3, dtype=dtype).as_subclass(_LooksLikeCuda)
        supported = [width for width in range(1, 6) if ssd_mod.causal_conv1d_kernel_supports(on_cuda, width)]
        assert supported == ([] if dtype == torch.float64 else [2, 3, 4])
    assert not ssd_mod.causal_conv1d_kernel_supports(torch.zeros(1, 2, 3), 3)


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_shifted_conv_backward_gives_exactly_the_gradients_asked_for(needs):
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    (x if needs == "x" else weight).requires_grad_(True)
    causal_depthwise_conv1d(x, weight, impl="shifted", channels_last=True).pow(2).sum().backward()
    reference_x, reference_weight = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    conv1d_reference(reference_x.transpose(1, 2), reference_weight, None, None).pow(2).sum().backward()
    if needs == "x":
        torch.testing.assert_close(x.grad, reference_x.grad)
    else:
        torch.testing.assert_close(weight.grad, reference_weight.grad)
