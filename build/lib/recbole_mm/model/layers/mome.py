"""Speeder's Multimodal Representation Compression (MRC, paper Sec. 2.3).

One item = one vector in the LLM's hidden size:
frozen per-modality features -> modality adapters A_m (eqs. 1-3) -> gate on non-text modalities
(eq. 18) -> a 3-token sequence (eq. 4) -> MoME: L1 layers of shared MHSA + hard-routed modality
expert FFNs, then L2 layers of MHSA + one multimodal expert (eqs. 5-9) -> average pooling over the
present modality tokens -> output adapter A_f (eq. 10).

Modalities are named (``text``, ``image``, ``id``, ...); the order given at construction is the
token order. A modality can be left out of a forward call (MPO stage 1 feeds text only) and an item
can miss a modality (presence mask): absent tokens are masked out of attention and pooling.
"""

from typing import Dict, Optional, Sequence

import torch
from torch import nn

GATE_KINDS = ("tanh", "relu", "none")
MULTIMODAL_EXPERT = "multimodal"


class FeedForwardAdapter(nn.Module):
    """Two-layer MLP adapter (A_t, A_v, A_s, A_f): Linear -> GELU -> Linear."""

    def __init__(self, input_size: int, output_size: int, hidden_size: Optional[int] = None):
        super().__init__()
        hidden_size = hidden_size or output_size
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, output_size)
        )

    def forward(self, x):
        return self.net(x)


class ModalityGate(nn.Module):
    """Eq. 18: e = tanh(A^tan(e)) * e for a non-text modality (``relu`` / ``none`` are the ablations).

    The tanh gate starts closed (A^tan zero-initialised, tanh(0) = 0), so a newly introduced
    modality enters the LLM gradually, as in Flamingo's tanh gating the paper cites; a zero-initialised
    ReLU gate would never open (zero gradient at 0), so it keeps PyTorch's default init.
    """

    def __init__(self, hidden_size: int, kind: str = "tanh"):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"gate={kind!r}: choose one of {', '.join(GATE_KINDS)}.")
        self.kind = kind
        self.adapter = nn.Linear(hidden_size, hidden_size) if kind != "none" else None
        if kind == "tanh":
            nn.init.zeros_(self.adapter.weight)
            nn.init.zeros_(self.adapter.bias)

    def forward(self, e):
        if self.kind == "none":
            return e
        activation = torch.tanh if self.kind == "tanh" else torch.relu
        return activation(self.adapter(e)) * e


class ModalityExpert(nn.Module):
    """One expert FFN with its output LayerNorm and residual (eqs. 8-9)."""

    def __init__(self, hidden_size: int, inner_size: int, dropout: float):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, inner_size), nn.ReLU(), nn.Linear(inner_size, hidden_size), nn.Dropout(dropout)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden):
        return self.norm(self.ffn(hidden)) + hidden


class MoMELayer(nn.Module):
    """Shared MHSA + LayerNorm (eqs. 5-7) followed by expert FFNs (eqs. 8-9).

    ``expert_names`` = the modalities: hard routing, the token of modality m goes only through
    expert m (an L1 layer). ``expert_names`` = None: every token goes through the one multimodal
    expert (an L2 layer).
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        inner_size: int,
        dropout: float,
        expert_names: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"mome_hidden_size={hidden_size} must be divisible by mome_n_heads={n_heads}.")
        self.attention = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.hard_routed = expert_names is not None
        names = list(expert_names) if self.hard_routed else [MULTIMODAL_EXPERT]
        self.experts = nn.ModuleDict({name: ModalityExpert(hidden_size, inner_size, dropout) for name in names})

    def forward(self, hidden, token_modalities: Sequence[str], padding_mask=None):
        attended, _ = self.attention(hidden, hidden, hidden, key_padding_mask=padding_mask, need_weights=False)
        hidden = self.attention_norm(attended + hidden)  # eq. 7
        return self.route(hidden, token_modalities)

    def route(self, hidden, token_modalities: Sequence[str]):
        """Apply the experts to H' (B, M, d): token k of modality m through expert m only."""
        if not self.hard_routed:
            return self.experts[MULTIMODAL_EXPERT](hidden)
        outputs = [self.experts[modality](hidden[:, k]) for k, modality in enumerate(token_modalities)]
        return torch.stack(outputs, dim=1)


class MultimodalItemCompressor(nn.Module):
    """MRC: per-modality features of N items -> (N, output_size) item tokens (eq. 10).

    ``input_sizes``: modality name -> feature dimension, in token order (eq. 4).
    ``ungated``: modalities without the eq. 18 gate (the paper gates every non-text modality).
    """

    def __init__(
        self,
        input_sizes: Dict[str, int],
        hidden_size: int,
        output_size: int,
        n_heads: int = 2,
        inner_size: Optional[int] = None,
        modality_layers: int = 1,
        multimodal_layers: int = 1,
        dropout: float = 0.1,
        gate: str = "tanh",
        ungated: Sequence[str] = ("text",),
    ):
        super().__init__()
        if not input_sizes:
            raise ValueError("MultimodalItemCompressor needs at least one modality.")
        inner_size = inner_size or 4 * hidden_size
        self.modalities = list(input_sizes)
        self.adapters = nn.ModuleDict(
            {m: FeedForwardAdapter(size, hidden_size, hidden_size) for m, size in input_sizes.items()}
        )
        self.gates = nn.ModuleDict({m: ModalityGate(hidden_size, gate) for m in self.modalities if m not in ungated})
        self.modality_layers = nn.ModuleList(
            MoMELayer(hidden_size, n_heads, inner_size, dropout, self.modalities) for _ in range(modality_layers)
        )
        self.multimodal_layers = nn.ModuleList(
            MoMELayer(hidden_size, n_heads, inner_size, dropout, None) for _ in range(multimodal_layers)
        )
        self.output_adapter = FeedForwardAdapter(hidden_size, output_size, output_size)

    def modality_parameters(self, modality: str):
        """Parameters that see only ``modality``: its adapter, gate and L1 experts."""
        modules = [self.adapters[modality]]
        if modality in self.gates:
            modules.append(self.gates[modality])
        modules += [layer.experts[modality] for layer in self.modality_layers]
        return [p for module in modules for p in module.parameters()]

    def fusion_parameters(self):
        """Parameters shared across modalities: every MHSA, its LayerNorm and the multimodal experts."""
        modality_specific = {id(p) for m in self.modalities for p in self.modality_parameters(m)}
        output = {id(p) for p in self.output_adapter.parameters()}
        return [p for p in self.parameters() if id(p) not in modality_specific | output]

    def embed_modalities(self, features: Dict[str, torch.Tensor]):
        """Adapters (eqs. 1-3) and gates (eq. 18): the (N, M, d) token stack of eq. 4."""
        unknown = set(features) - set(self.modalities)
        if unknown:
            raise KeyError(f"unknown modalities {sorted(unknown)}; this compressor has {self.modalities}.")
        tokens = []
        for modality in self.active_modalities(features):
            e = self.adapters[modality](features[modality])
            if modality in self.gates:
                e = self.gates[modality](e)
            tokens.append(e)
        return torch.stack(tokens, dim=1)

    def active_modalities(self, features):
        return [m for m in self.modalities if m in features]

    def forward(self, features: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None):
        """features: modality -> (N, D_m) for the modalities used now; present: modality -> (N,) bool."""
        active = self.active_modalities(features)
        hidden = self.embed_modalities(features)
        n_items = hidden.shape[0]
        if present is None:
            present = {}
        keep = torch.stack(
            [present.get(m, torch.ones(n_items, dtype=torch.bool, device=hidden.device)).bool() for m in active], dim=1
        )
        # An item with no modality at all would make every attention row -inf (NaN softmax): let its
        # tokens attend normally and drop them at pooling, so it gets A_f(0).
        no_modality = ~keep.any(dim=1, keepdim=True)
        padding_mask = ~(keep | no_modality)
        for layer in self.modality_layers:
            hidden = layer(hidden, active, padding_mask)
        for layer in self.multimodal_layers:
            hidden = layer(hidden, active, padding_mask)
        weights = keep.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # AvgPooling over present tokens
        return self.output_adapter(pooled)  # eq. 10
