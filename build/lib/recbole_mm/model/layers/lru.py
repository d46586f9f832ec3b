"""Linear Recurrent Unit (Orvieto et al., 2023), as used by LRURec and fMRLRec.

    h_t = lambda * h_{t-1} + gamma * (B x_t + b_B),    y_t = Re(C h_t + b_C)

with a complex diagonal ``lambda`` (ring initialisation), a learned normalisation ``gamma`` and
complex input/output projections ``B``, ``C``. The projections are fMRL operators over nested
sizes (one size = plain dense LRU), and ``lambda``/``gamma`` are elementwise, so state dim ``i``
only ever sees input dims inside its own nested prefix.

The same function has three implementations:
- ``linear_recurrence_reference``: the obvious Python loop over time (the reference);
- ``linear_recurrence_parallel``: a log-depth doubling scan for batched training;
- ``LRU.step``: one recurrence step carrying the state, O(1) per new interaction.
Right padding (RecBole's layout) never reaches a real position: the recurrence is causal, so
position ``t`` only depends on inputs ``<= t``.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.model.layers.matryoshka import MatryoshkaLinear, check_nested_sizes


def linear_recurrence_reference(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``h_t = decay * h_{t-1} + inputs_t`` with ``h_{-1} = 0``, one time step at a time.

    decay: (H,) complex; inputs: (B, L, H) complex -> states (B, L, H).
    """
    state = torch.zeros_like(inputs[:, 0])
    states = []
    for t in range(inputs.shape[1]):
        state = decay * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


def linear_recurrence_parallel(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Same function as ``linear_recurrence_reference`` in ceil(log2 L) vectorised steps.

    Doubling scan: after the step with offset ``k`` every position holds the sum of its last
    ``2k`` inputs weighted by powers of ``decay`` (``h_t = sum_i decay^i inputs_{t-i}``, paper eq. 9).
    """
    states = inputs
    decay_power = decay
    offset = 1
    length = inputs.shape[1]
    while offset < length:
        # shift right by ``offset`` (zeros enter at the front): one slice, so one gradient buffer
        states = states + decay_power * F.pad(states[:, :-offset], (0, 0, offset, 0))
        decay_power = decay_power * decay_power
        offset *= 2
    return states


SCANS = {"parallel": linear_recurrence_parallel, "reference": linear_recurrence_reference}


class LRU(nn.Module):
    """LRU layer over nested sizes ``sizes`` (hidden size = state size = ``sizes[-1]``)."""

    def __init__(
        self,
        sizes: Sequence[int],
        r_min: float = 0.0,
        r_max: float = 0.1,
        scan: str = "parallel",
    ):
        super().__init__()
        self.sizes = check_nested_sizes(sizes)
        if not 0.0 <= r_min <= r_max < 1.0:
            raise ValueError(
                f"LRU ring initialisation needs 0 <= lru_r_min <= lru_r_max < 1, got "
                f"lru_r_min={r_min}, lru_r_max={r_max}."
            )
        if scan not in SCANS:
            raise ValueError(f"LRU scan must be one of {sorted(SCANS)}, got {scan!r}.")
        self.scan = scan
        hidden_size = self.sizes[-1]

        # Ring initialisation (Orvieto et al. 2023, Lemma 3.2): |lambda| uniform on the ring
        # [r_min, r_max] in area, phase uniform in [0, 2*pi]. 1 - rand lies in (0, 1], keeping logs finite.
        u1 = 1.0 - torch.rand(hidden_size)
        u2 = 1.0 - torch.rand(hidden_size)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(2 * math.pi * u2)
        # gamma = sqrt(1 - |lambda|^2) keeps the state's scale independent of the memory length.
        gamma_log = 0.5 * torch.log(-torch.expm1(-2 * torch.exp(nu_log)))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(gamma_log)

        # Complex B and C as (real, imaginary) pairs of real fMRL operators. The imaginary part of
        # C's bias would never reach Re(.), so C carries a real bias only.
        self.in_proj_real = MatryoshkaLinear(self.sizes, self.sizes, bias=True)
        self.in_proj_imag = MatryoshkaLinear(self.sizes, self.sizes, bias=True)
        self.out_proj_real = MatryoshkaLinear(self.sizes, self.sizes, bias=True)
        self.out_proj_imag = MatryoshkaLinear(self.sizes, self.sizes, bias=False)
        self._init_projections()

    def _init_projections(self):
        # Complex Glorot-style init of the LRU paper: B ~ CN(0, 1/H_in), C ~ CN(0, 2/H) per chunk fan-in.
        for proj, scale in (
            (self.in_proj_real, 0.5),
            (self.in_proj_imag, 0.5),
            (self.out_proj_real, 1.0),
            (self.out_proj_imag, 1.0),
        ):
            for chunk in proj.chunks:
                nn.init.normal_(chunk.weight, std=math.sqrt(scale / chunk.in_features))
                if chunk.bias is not None:
                    nn.init.zeros_(chunk.bias)

    @property
    def hidden_size(self) -> int:
        return self.sizes[-1]

    def decay(self) -> torch.Tensor:
        """Diagonal of the recurrence, ``lambda = exp(-exp(nu_log) + i exp(theta_log))``: (H,) complex."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def _drive(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input ``gamma * (B x + b_B)`` (complex)."""
        projected = torch.complex(self.in_proj_real(x), self.in_proj_imag(x))
        return torch.exp(self.gamma_log) * projected

    def _readout(self, states: torch.Tensor) -> torch.Tensor:
        """``Re(C h + b_C) = C_re h_re - C_im h_im + b_C``."""
        return self.out_proj_real(states.real) - self.out_proj_imag(states.imag)

    def forward(
        self, x: torch.Tensor, return_states: bool = False
    ) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, H) real -> y: (B, L, H) real (and the complex states (B, L, H) if asked)."""
        states = SCANS[self.scan](self.decay(), self._drive(x))
        output = self._readout(states)
        return (output, states) if return_states else output

    def step(
        self, x_t: torch.Tensor, state: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One recurrence step (paper eq. 8). x_t: (B, H) real; state: (B, H) complex or None
        (empty history). Returns (y_t, new state)."""
        drive = self._drive(x_t)
        new_state = drive if state is None else self.decay() * state + drive
        return self._readout(new_state), new_state
