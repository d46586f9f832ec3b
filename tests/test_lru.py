"""LRU layer: parallel scan, step mode and the naive recurrence compute the same function."""

import math

import pytest
import torch

from recbole_mm.model.layers.lru import (
    LRU,
    linear_recurrence_parallel,
    linear_recurrence_reference,
)
from recbole_mm.model.layers.matryoshka import nested_state_dict

SIZES = [4, 8, 16]


def random_decay(hidden, generator):
    radius = 0.3 + 0.69 * torch.rand(hidden, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(hidden, generator=generator, dtype=torch.float64)
    return torch.polar(radius, phase)


def random_complex(*shape, generator):
    return torch.complex(
        torch.randn(*shape, generator=generator, dtype=torch.float64),
        torch.randn(*shape, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 9, 50])
def test_reference_recurrence_equals_closed_form(length):
    g = torch.Generator().manual_seed(length)
    decay, inputs = random_decay(6, g), random_complex(2, length, 6, generator=g)
    # Paper eq. 9: h_t = sum_{i <= t} lambda^(t - i) u_i, with an explicit power per term.
    expected = torch.stack(
        [sum(decay ** (t - i) * inputs[:, i] for i in range(t + 1)) for t in range(length)], dim=1
    )
    torch.testing.assert_close(linear_recurrence_reference(decay, inputs), expected)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 50, 200])
def test_parallel_scan_equals_naive_recurrence(length):
    g = torch.Generator().manual_seed(length)
    decay, inputs = random_decay(6, g), random_complex(3, length, 6, generator=g)
    torch.testing.assert_close(
        linear_recurrence_parallel(decay, inputs),
        linear_recurrence_reference(decay, inputs),
        rtol=1e-10,
        atol=1e-10,
    )


def make_lru(seed=0, **kwargs):
    torch.manual_seed(seed)
    return LRU(SIZES, **kwargs).double()


def test_layer_parallel_mode_equals_reference_mode():
    lru = make_lru()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    parallel = lru(x)
    lru.scan = "reference"
    torch.testing.assert_close(parallel, lru(x), rtol=1e-10, atol=1e-10)


def test_step_mode_equals_parallel_scan_on_every_prefix():
    lru = make_lru()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full_output, full_states = lru(x, return_states=True)
    state = None
    for t in range(x.shape[1]):
        y_t, state = lru.step(x[:, t], state)
        prefix_output = lru(x[:, : t + 1])
        torch.testing.assert_close(y_t, prefix_output[:, -1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y_t, full_output[:, t], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state, full_states[:, t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_pad", [1, 4, 29])
def test_right_padding_never_changes_real_positions(n_pad):
    lru = make_lru()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    unpadded = lru(x)
    for padding in (torch.zeros(2, n_pad, 16, dtype=torch.float64), 100 * torch.randn(2, n_pad, 16, dtype=torch.float64)):
        padded = lru(torch.cat([x, padding], dim=1))
        torch.testing.assert_close(padded[:, :5], unpadded, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r_min,r_max", [(0.0, 0.1), (0.4, 0.5), (0.8, 0.99)])
def test_ring_initialisation(r_min, r_max):
    torch.manual_seed(0)
    lru = LRU([256], r_min=r_min, r_max=r_max)
    decay = lru.decay()
    assert r_min - 1e-6 <= decay.abs().min() and decay.abs().max() <= r_max + 1e-6
    # gamma normalisation: a unit-variance drive gives a unit-variance stationary state.
    torch.testing.assert_close(torch.exp(lru.gamma_log), torch.sqrt(1 - decay.abs() ** 2))


def test_ring_initialisation_distribution_written_out():
    """Orvieto et al. 2023, Lemma 3.2: |lambda|^2 uniform on [r_min^2, r_max^2] (uniform in area) and the
    phase theta = exp(theta_log) uniform on [0, 2 pi] (the parameter itself, not only lambda: the phase's
    gradient scales with theta). Checked by moments and range over many draws."""
    torch.manual_seed(1)
    r_min, r_max, n = 0.4, 0.9, 20000
    lru = LRU([n], r_min=r_min, r_max=r_max)
    squared_radius = lru.decay().abs().double() ** 2
    mean, std_of_mean = (r_min**2 + r_max**2) / 2, (r_max**2 - r_min**2) / math.sqrt(12 * n)
    assert abs(squared_radius.mean().item() - mean) < 4 * std_of_mean
    theta = torch.exp(lru.theta_log).double()
    assert 0 < theta.min() and theta.max() <= 2 * math.pi + 1e-5
    assert abs(theta.mean().item() - math.pi) < 4 * 2 * math.pi / math.sqrt(12 * n)
    assert abs(theta.var().item() - (2 * math.pi) ** 2 / 12) < 0.05 * (2 * math.pi) ** 2 / 12


def test_a_ring_of_one_radius_is_allowed():
    lru = LRU([64], r_min=0.5, r_max=0.5)
    torch.testing.assert_close(lru.decay().abs(), torch.full((64,), 0.5), rtol=1e-5, atol=1e-6)


def test_projection_init_and_parameters_written_out():
    """Complex Glorot init of the LRU paper per chunk fan-in: B ~ CN(0, 1/H_in) (real and imaginary parts
    each of variance 1/(2 H_in)), C ~ CN(0, 2/H) (each part 1/H), zero biases; C carries a real bias only.
    Parameter count written out: 3 H (nu, theta, gamma) + 4 block-triangular weights + 3 biases of H."""
    torch.manual_seed(2)
    sizes = [64, 128, 256]
    lru = LRU(sizes)
    for proj, part_variance in ((lru.in_proj_real, 0.5), (lru.in_proj_imag, 0.5),
                                (lru.out_proj_real, 1.0), (lru.out_proj_imag, 1.0)):
        for chunk, fan_in in zip(proj.chunks, sizes):
            expected = math.sqrt(part_variance / fan_in)
            assert abs(chunk.weight.std().item() / expected - 1) < 0.05, (proj, fan_in)
            assert abs(chunk.weight.mean().item()) < 4 * expected / math.sqrt(chunk.weight.numel())
    for proj in (lru.in_proj_real, lru.in_proj_imag, lru.out_proj_real):
        assert all(chunk.bias is not None and not chunk.bias.any() for chunk in proj.chunks)
    assert all(chunk.bias is None for chunk in lru.out_proj_imag.chunks)
    hidden = sizes[-1]
    block_weights = sum((end - start) * fan_in for fan_in, start, end in zip(sizes, [0] + sizes[:-1], sizes))
    assert sum(p.numel() for p in lru.parameters()) == 3 * hidden + 4 * block_weights + 3 * hidden


def test_unknown_scan_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"LRU scan must be one of \['parallel', 'reference'\], got 'fast'"):
        LRU(SIZES, scan="fast")


def test_bad_radius_is_rejected():
    with pytest.raises(ValueError, match="lru_r_min"):
        LRU(SIZES, r_min=0.5, r_max=0.4)
    with pytest.raises(ValueError, match="lru_r_max"):
        LRU(SIZES, r_min=0.5, r_max=1.0)


@pytest.mark.parametrize("n_kept", [1, 2])
def test_first_dims_equal_extracted_small_lru(n_kept):
    full = make_lru()
    small = LRU(SIZES[:n_kept]).double()
    small.load_state_dict(nested_state_dict(small, full.state_dict()))
    s = SIZES[n_kept - 1]
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(small(x[..., :s]), full(x)[..., :s], rtol=1e-12, atol=1e-12)


def test_layer_output_equals_complex_recurrence_written_out():
    """The whole layer against eq. 1 with explicit complex matrices, one time step at a time:
    lambda_k = exp(-exp(nu_k) + i exp(theta_k)), gamma_k = exp(gamma_log_k),
    h_t = lambda * h_{t-1} + gamma * (B x_t + b_B),  y_t = Re(C h_t) + b_C."""
    lru = make_lru(seed=3)
    with torch.no_grad():  # non-zero biases, so every term is checked
        for proj in (lru.in_proj_real, lru.in_proj_imag, lru.out_proj_real):
            for chunk in proj.chunks:
                chunk.bias.normal_()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    B = torch.complex(lru.in_proj_real.masked_weight(), lru.in_proj_imag.masked_weight()).detach()
    b_B = torch.complex(
        torch.cat([c.bias for c in lru.in_proj_real.chunks]), torch.cat([c.bias for c in lru.in_proj_imag.chunks])
    ).detach()
    C = torch.complex(lru.out_proj_real.masked_weight(), lru.out_proj_imag.masked_weight()).detach()
    b_C = torch.cat([c.bias for c in lru.out_proj_real.chunks]).detach()
    nu, theta, gamma_log = (p.detach() for p in (lru.nu_log, lru.theta_log, lru.gamma_log))
    lam = [complex(math.exp(-math.exp(n)) * math.cos(math.exp(a)), math.exp(-math.exp(n)) * math.sin(math.exp(a)))
           for n, a in zip(nu.tolist(), theta.tolist())]
    gamma = [math.exp(g) for g in gamma_log.tolist()]
    expected = torch.zeros(2, 6, 16, dtype=torch.float64)
    for b in range(2):
        h = [0j] * 16
        for t in range(6):
            u = B @ x[b, t].to(torch.complex128) + b_B
            h = [lam[k] * h[k] + gamma[k] * complex(u[k]) for k in range(16)]
            y = (C @ torch.tensor(h, dtype=torch.complex128)).real + b_C
            expected[b, t] = y
    with torch.no_grad():
        torch.testing.assert_close(lru(x), expected, rtol=1e-10, atol=1e-10)
        lru.scan = "reference"
        torch.testing.assert_close(lru(x), expected, rtol=1e-10, atol=1e-10)
        state = None
        for t in range(6):
            y_t, state = lru.step(x[:, t], state)
            torch.testing.assert_close(y_t, expected[:, t], rtol=1e-10, atol=1e-10)
