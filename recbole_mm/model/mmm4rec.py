"""MMM4Rec: time-aware SSD alignment of two modality streams, then cross-SSD fusion.

Paper: "Transferable Sequential Recommendation with Vanilla Cross-Entropy Loss" (MMM4Rec,
arXiv:2506.02916); where the paper leaves the math open it follows the authors' code
(github.com/AlwaysFHao/MMM4Rec). Equation numbers below are the paper's.

Two streams, named by ``modalities: [key_modality, query_modality]`` (paper: [text, image]):
per layer the key stream (text) goes through a time-aware SSD (TiSSD) + FFN ("alignment"); the query
stream (image) goes through the *same* TiSSD module (weight sharing, eqs. 10-11), then a cross SSD
(TiCoSSD, eqs. 16-17) reads x, B, delta from the key stream and C from the query stream. The user
vector is the query stream's output at the last real position; items are scored through the same
adapters (eq. 19).

Time (eqs. 5-6): inter-item time differences, normalised over the sequence axis, modulate the SSD
step size. Those time operations mix positions (Linear over L, LayerNorm over L, FFT over L), so
padding and the target's timestamp are masked out before every one of them; the official loader's
target-timestamp leak is only available behind ``leak_target_timestamp: True``. Without timestamps
the model runs the paper's w/o-Time variant (and says so in the log).

CPU path: the SSD scan is ``recbole_mm.model.layers.ssd`` (chunked pure-PyTorch form on CPU,
mamba-ssm's kernel on CUDA when installed; ``ssd_impl`` overrides).
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.abstract import MultimodalSequentialRecommender
from recbole_mm.model.layers.ssd import CONV_IMPLS, SSD_IMPLS, CausalDepthwiseConv1d, GatedRMSNorm, ssd
from recbole_mm.utils import RecboleMMError

logger = logging.getLogger(__name__)


def masked_sequence_layer_norm(values, mask, norm):
    """LayerNorm over the sequence axis using only the real positions (``mask``); padding -> 0.

    values (..., L); mask broadcastable to values; norm: nn.LayerNorm(L) whose affine weights are
    per position. Statistics over real positions only, so nothing stored at padded positions
    (padding item ids, RecBole's zero timestamps, a leaked target time) can reach real positions.
    """
    weight = mask.to(values.dtype)
    count = weight.sum(dim=-1, keepdim=True).clamp(min=1.0)
    mean = (values * weight).sum(dim=-1, keepdim=True) / count
    centred = (values - mean) * weight
    variance = centred.pow(2).sum(dim=-1, keepdim=True) / count
    normed = centred * torch.rsqrt(variance + norm.eps)
    return (normed * norm.weight + norm.bias) * weight


class TimeAwareStep(nn.Module):
    """Time modulation of the SSD step (eq. 5-6): tau = SiLU(CConv2(SiLU(CConv1(T * S(T))))).

    S = Tanhshrink(W2 SiLU(W1 Dropout(T))) with W1, W2: Linear(L -> L) along the sequence axis; the
    two depthwise convolutions are causal over L with one channel per head. Input T (B, H, L) is
    zero at padded positions.
    """

    def __init__(self, n_heads, max_len, d_conv, time_dropout_prob, conv_impl):
        super().__init__()
        self.time_scale = nn.Sequential(
            nn.Dropout(time_dropout_prob),
            nn.Linear(max_len, max_len),
            nn.SiLU(),
            nn.Linear(max_len, max_len),
            nn.Tanhshrink(),
        )
        self.conv1 = CausalDepthwiseConv1d(n_heads, d_conv, activation="silu", impl=conv_impl)
        self.conv2 = CausalDepthwiseConv1d(n_heads, d_conv, activation="silu", impl=conv_impl)

    def forward(self, time, mask):
        scaled = time * self.time_scale(time) * mask
        return self.conv2(self.conv1(scaled))


class SSDParameters(nn.Module):
    """A, delta bias and skip D of one SSD, initialised as in Mamba-2."""

    def __init__(self, n_heads, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, a_init_range=(1.0, 16.0)):
        super().__init__()
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(*a_init_range).log())
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))  # log-uniform
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.D = nn.Parameter(torch.ones(n_heads))

    def scan(self, x, dt, B, C, chunk_size, impl):
        """y = SSD(x, softplus(dt + dt_bias), -exp(A_log), B, C, D) with skip D * delta * x (authors' TiSSD)."""
        delta = F.softplus(dt + self.dt_bias)
        return ssd(x, delta, -torch.exp(self.A_log), B, C, self.D, chunk_size=chunk_size, impl=impl)


class _TimeAwareSSDBlock(nn.Module):
    """What TiSSD and TiCoSSD share: head/group sizes, the SSD parameters and scan, the gated output
    norm and projection, and the time-modulated step. Subclasses build their own input projections
    before calling ``build_scan_head`` (that order keeps parameter initialisation reproducible)."""

    def __init__(self, d_model, d_state, n_groups, expand, head_dim, chunk_size, is_time, ssd_impl, conv_impl):
        super().__init__()
        self.d_inner = expand * d_model
        self.head_dim = head_dim
        self.n_heads = self.d_inner // head_dim
        self.n_groups, self.d_state = n_groups, d_state
        self.chunk_size, self.ssd_impl, self.conv_impl, self.is_time = chunk_size, ssd_impl, conv_impl, is_time

    def build_scan_head(self, d_model, max_len, d_conv, time_dropout_prob, norm_eps):
        self.params = SSDParameters(self.n_heads)
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model)
        if self.is_time:
            self.time_step = TimeAwareStep(self.n_heads, max_len, d_conv, time_dropout_prob, self.conv_impl)

    def scan_and_project(self, x, dt, B, C, z):
        batch, length, _ = x.shape
        y = self.params.scan(
            x.reshape(batch, length, self.n_heads, self.head_dim), dt,
            B.reshape(batch, length, self.n_groups, self.d_state),
            C.reshape(batch, length, self.n_groups, self.d_state), self.chunk_size, self.ssd_impl,
        )
        return self.out_proj(self.norm(y.reshape(batch, length, self.d_inner), z))


class TiSSD(_TimeAwareSSDBlock):
    """Time-aware SSD block (eqs. 3-9): Mamba-2 projections + causal conv, step modulated by time.

    forward(u (B, L, d), time (B, H, L) or None, mask (B, 1, L)) -> (out (B, L, d), time' or None),
    time' = masked LN_L(g T + (1 - g) tau), g = sigmoid(Linear(L -> 1)(Dropout(T))), for the next layer.
    """

    def __init__(self, d_model, max_len, d_state, n_groups, d_conv, expand, head_dim, chunk_size,
                 time_dropout_prob, norm_eps, is_time, ssd_impl, conv_impl):
        super().__init__(d_model, d_state, n_groups, expand, head_dim, chunk_size, is_time, ssd_impl, conv_impl)
        bc_size = 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + bc_size + self.n_heads)  # [z | x B C | dt]
        self.conv = CausalDepthwiseConv1d(self.d_inner + bc_size, d_conv, activation="silu", impl=conv_impl,
                                          channels_last=True)
        self.build_scan_head(d_model, max_len, d_conv, time_dropout_prob, norm_eps)
        if is_time:
            self.time_gate = nn.Sequential(nn.Dropout(time_dropout_prob), nn.Linear(max_len, 1), nn.Sigmoid())
            self.time_norm = nn.LayerNorm(max_len, eps=norm_eps)

    def forward(self, u, time, mask):
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.n_groups * self.d_state,
                                            self.n_heads], dim=-1)
        xBC = self.conv(xBC)
        x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        if self.is_time:
            tau = self.time_step(time, mask)  # (B, H, L)
            dt = dt * tau.transpose(1, 2)
        out = self.scan_and_project(x, dt, B, C, z)
        if not self.is_time:
            return out, None
        gate = self.time_gate(time)  # (B, H, 1)
        return out, masked_sequence_layer_norm(gate * time + (1 - gate) * tau, mask, self.time_norm)


class TiCoSSD(_TimeAwareSSDBlock):
    """Time-aware cross SSD (eqs. 16-17): x, B, dt from the key stream; C from the query stream.

    z = W_z(query + key) gates the output; delta is modulated by the fused time signal T_co.
    """

    def __init__(self, d_model, max_len, d_state, n_groups, d_conv, expand, head_dim, chunk_size,
                 time_dropout_prob, norm_eps, is_time, ssd_impl, conv_impl):
        super().__init__(d_model, d_state, n_groups, expand, head_dim, chunk_size, is_time, ssd_impl, conv_impl)
        bc_size = n_groups * d_state
        self.key_proj = nn.Linear(d_model, self.d_inner + bc_size + self.n_heads)  # [x | B | dt]
        self.gate_proj = nn.Linear(d_model, self.d_inner)
        self.query_proj = nn.Linear(d_model, bc_size)  # C
        self.key_conv = CausalDepthwiseConv1d(self.d_inner + bc_size, d_conv, activation="silu", impl=conv_impl,
                                              channels_last=True)
        self.query_conv = CausalDepthwiseConv1d(bc_size, d_conv, activation="silu", impl=conv_impl, channels_last=True)
        self.build_scan_head(d_model, max_len, d_conv, time_dropout_prob, norm_eps)

    def forward(self, key, query, time, mask):
        xB, dt = self.key_proj(key).split([self.d_inner + self.n_groups * self.d_state, self.n_heads], dim=-1)
        x, B = self.key_conv(xB).split([self.d_inner, self.n_groups * self.d_state], dim=-1)
        C = self.query_conv(self.query_proj(query))
        z = self.gate_proj(query + key)
        if self.is_time:
            dt = dt * self.time_step(time, mask).transpose(1, 2)
        return self.scan_and_project(x, dt, B, C, z)


class ComplexLinear(nn.Module):
    """Linear map on complex inputs from two real Linears: (W_r F_re - W_i F_im) + i (W_i F_re + W_r F_im)."""

    def __init__(self, features):
        super().__init__()
        self.real = nn.Linear(features, features)
        self.imag = nn.Linear(features, features)

    def forward(self, spectrum):
        re, im = spectrum.real, spectrum.imag
        return torch.complex(self.real(re) - self.imag(im), self.imag(re) + self.real(im))


class DualChannelFourierFilter(nn.Module):
    """Frequency-domain fusion of the two streams' time signals (eqs. 12-15).

    F_q = rfft(T_q) * CL_q(rfft(T_q)); F_k likewise; T_co = irfft(CL_co(F_q + F_k)), all over L with
    norm='ortho'. Inputs are zero at padding; the output is re-masked (irfft spreads over all of L).
    """

    def __init__(self, max_len):
        super().__init__()
        self.max_len = max_len
        bins = max_len // 2 + 1
        self.query_filter = ComplexLinear(bins)
        self.key_filter = ComplexLinear(bins)
        self.fusion_filter = ComplexLinear(bins)

    def forward(self, query_time, key_time, mask):
        query_spectrum = torch.fft.rfft(query_time.to(torch.promote_types(query_time.dtype, torch.float32)), dim=-1, norm="ortho")
        key_spectrum = torch.fft.rfft(key_time.to(torch.promote_types(key_time.dtype, torch.float32)), dim=-1, norm="ortho")
        fused = (query_spectrum * self.query_filter(query_spectrum)
                 + key_spectrum * self.key_filter(key_spectrum))
        fused_time = torch.fft.irfft(self.fusion_filter(fused), n=self.max_len, dim=-1, norm="ortho")
        return fused_time.to(query_time.dtype) * mask


class FeedForward(nn.Module):
    """FFN(h) = LN(Dropout(W2 Dropout(Hardswish(W1 h))) + h) (eq. 11)."""

    def __init__(self, d_model, inner_size, dropout_prob, norm_eps):
        super().__init__()
        self.inner = nn.Linear(d_model, inner_size)
        self.outer = nn.Linear(inner_size, d_model)
        self.activation = nn.Hardswish()
        self.dropout = nn.Dropout(dropout_prob)
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)

    def forward(self, hidden):
        out = self.outer(self.dropout(self.activation(self.inner(hidden))))
        return self.norm(self.dropout(out) + hidden)


class MMM4RecLayer(nn.Module):
    """One alignment-then-fusion layer (eqs. 10-18).

    key' = FFN_k(LN_a(Dropout(TiSSD(key)) + key))
    H_q  = LN_c(Dropout(TiSSD(query)) + query)          same TiSSD object unless is_shared_ssd=False
    T_co = FourierFilter(T_q', T_k')
    query' = FFN_q(LN_d(Dropout(TiCoSSD(key', H_q, T_co)) + H_q + key'))
    """

    def __init__(self, is_shared_ssd, d_model, inner_size, dropout_prob, norm_eps, is_time, max_len, **ssd_kwargs):
        super().__init__()
        ssd_args = dict(d_model=d_model, max_len=max_len, norm_eps=norm_eps, is_time=is_time, **ssd_kwargs)
        self.alignment_ssd = TiSSD(**ssd_args)
        self.query_alignment_ssd = None if is_shared_ssd else TiSSD(**ssd_args)  # "w/o Shared" ablation
        self.key_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.query_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.key_ffn = FeedForward(d_model, inner_size, dropout_prob, norm_eps)
        self.fourier_filter = DualChannelFourierFilter(max_len) if is_time else None
        self.cross_ssd = TiCoSSD(**ssd_args)
        self.fusion_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.query_ffn = FeedForward(d_model, inner_size, dropout_prob, norm_eps)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, key, key_time, query, query_time, mask):
        aligned, key_time = self.alignment_ssd(key, key_time, mask)
        key = self.key_ffn(self.key_norm(self.dropout(aligned) + key))

        query_ssd = self.query_alignment_ssd or self.alignment_ssd
        aligned, query_time = query_ssd(query, query_time, mask)
        hidden = self.query_norm(self.dropout(aligned) + query)

        fused_time = self.fourier_filter(query_time, key_time, mask) if self.fourier_filter is not None else None
        fused = self.cross_ssd(key, hidden, fused_time, mask)
        query = self.query_ffn(self.fusion_norm(self.dropout(fused) + hidden + key))
        return key, key_time, query, query_time


class MMM4Rec(MultimodalSequentialRecommender):
    # Tensors tied to one dataset's item ids: dropped when a checkpoint is transferred to another dataset.
    domain_specific_prefixes = ("item_modality_bias.",)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if len(self.modalities) != 2:
            raise RecboleMMError(
                f"MMM4Rec needs exactly two modalities (key stream, query stream), got modalities: {self.modalities}. "
                "Set e.g. modalities: [text, image] in your config (properties/model/MMM4Rec.yaml)."
            )
        if config["loss_type"] != "CE":
            raise RecboleMMError("MMM4Rec trains with cross-entropy: set loss_type: CE.")
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.temperature = float(config["temperature"])
        self.in_batch_loss = bool(config["in_batch_loss"])
        self.loss_couples_batch_rows = self.in_batch_loss  # eq. 21's negatives are the batch's other targets
        self.mask_in_batch_duplicates = bool(config["mask_in_batch_duplicates"])
        self.is_modality_bias = bool(config["is_modality_bias"])
        self.leak_target_timestamp = bool(config["leak_target_timestamp"])
        self.initializer_range = config["initializer_range"]
        norm_eps = float(config["norm_eps"])
        expand, head_dim, n_groups = config["expand"], config["head_dim"], config["n_groups"]
        if (self.hidden_size * expand) % head_dim:
            raise RecboleMMError(f"MMM4Rec: hidden_size * expand ({self.hidden_size * expand}) must be divisible "
                                 f"by head_dim ({head_dim}).")
        self.n_heads = self.hidden_size * expand // head_dim
        if self.n_heads % n_groups:
            raise RecboleMMError(f"MMM4Rec: the number of heads ({self.n_heads}) must be divisible by n_groups "
                                 f"({n_groups}).")
        if config["ssd_impl"] not in SSD_IMPLS:
            raise RecboleMMError(f"MMM4Rec: ssd_impl must be one of {SSD_IMPLS}, got {config['ssd_impl']!r}.")
        if config["conv_impl"] not in CONV_IMPLS:
            raise RecboleMMError(f"MMM4Rec: conv_impl must be one of {CONV_IMPLS}, got {config['conv_impl']!r}.")

        self.is_time = bool(config["is_time"])
        if self.is_time and not self.has_timestamps:
            logger.warning(
                "MMM4Rec: dataset '%s' has no timestamps (no TIME_FIELD / timestamp_list, or timestamps_are_order: True), running the "
                "w/o-Time variant (is_time: False).", config["dataset"]
            )
            self.is_time = False
        if self.leak_target_timestamp and not self.is_time:
            raise RecboleMMError("MMM4Rec: leak_target_timestamp: True needs the time path (is_time with timestamps).")
        if self.is_time:
            self.TIME_FIELD = config["TIME_FIELD"]
            self.TIME_SEQ = self.TIME_FIELD + config["LIST_SUFFIX"]

        self.key_modality, self.query_modality = self.modalities
        self.adapters = nn.ModuleDict({m: nn.Linear(self.feature_dims[m], self.hidden_size) for m in self.modalities})
        if self.is_modality_bias:
            self.item_modality_bias = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(self.n_items, self.hidden_size)) for m in self.modalities}
            )
        self.input_norms = nn.ModuleDict({m: nn.LayerNorm(self.hidden_size, eps=norm_eps) for m in self.modalities})
        self.embedding_dropout = nn.Dropout(config["embedding_drop_prob"])
        if self.is_time:
            self.time_dropout = nn.Dropout(config["time_dropout_prob"])
            self.time_norm = nn.LayerNorm(self.max_seq_length, eps=norm_eps)
        self.layers = nn.ModuleList([
            MMM4RecLayer(
                is_shared_ssd=bool(config["is_shared_ssd"]), d_model=self.hidden_size,
                inner_size=config["inner_size"], dropout_prob=config["dropout_prob"], norm_eps=norm_eps,
                is_time=self.is_time, max_len=self.max_seq_length, d_state=config["d_state"], n_groups=n_groups,
                d_conv=config["d_conv"], expand=expand, head_dim=head_dim, chunk_size=config["chunk_size"],
                time_dropout_prob=config["time_dropout_prob"], ssd_impl=config["ssd_impl"],
                conv_impl=config["conv_impl"],
            )
            for _ in range(self.num_layers)
        ])
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    # ------------------------------------------------------------------ items
    def item_embeddings(self, modality, items=None):
        """e^m_i = W_m f^m_i + b_m (+ beta^m_i) (eq. 2); all items when ``items`` is None."""
        features = self.feature_table(modality)
        features = features if items is None else features[items]
        embedding = self.adapters[modality](features)
        if self.is_modality_bias:
            bias = self.item_modality_bias[modality]
            embedding = embedding + (bias if items is None else bias[items])
        return embedding

    # ------------------------------------------------------------------ sequences
    def fit_window(self, item_seq, item_seq_len, timestamps):
        """Right-padded (B, max_len) windows holding each sequence's last max_len items.

        RecBole pads to MAX_ITEM_LIST_LENGTH in normal mode; pre-split files may carry another
        width. The time ops are Linear(L -> L), so the width must be exactly max_len.
        """
        length = item_seq.shape[1]
        if length == self.max_seq_length:
            return item_seq, item_seq_len, timestamps
        if length < self.max_seq_length:
            pad = self.max_seq_length - length
            return (F.pad(item_seq, (0, pad)), item_seq_len,
                    None if timestamps is None else F.pad(timestamps, (0, pad)))
        start = (item_seq_len - self.max_seq_length).clamp(min=0)
        index = start[:, None] + torch.arange(self.max_seq_length, device=item_seq.device)
        new_len = item_seq_len.clamp(max=self.max_seq_length)
        valid = torch.arange(self.max_seq_length, device=item_seq.device)[None, :] < new_len[:, None]
        item_seq = item_seq.gather(1, index.clamp(max=length - 1)) * valid
        if timestamps is not None:
            timestamps = timestamps.gather(1, index.clamp(max=length - 1)) * valid
        return item_seq, new_len, timestamps

    def time_signal(self, timestamps, time_mask):
        """T = LN_L(Dropout(dt)) over the real positions, repeated over heads (eqs. 5-6): (B, H, L)."""
        differences = torch.zeros_like(timestamps)
        differences[:, 1:] = timestamps[:, 1:] - timestamps[:, :-1]
        differences = differences * time_mask  # dt_1 = 0 and nothing across the padding boundary
        signal = masked_sequence_layer_norm(self.time_dropout(differences), time_mask, self.time_norm)
        return signal[:, None, :].expand(-1, self.n_heads, -1)

    def forward(self, item_seq, item_seq_len, timestamps=None, target_timestamp=None):
        item_seq, item_seq_len, timestamps = self.fit_window(item_seq, item_seq_len, timestamps)
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        real = positions[None, :] < item_seq_len[:, None]  # (B, L)

        key, query = (
            self.input_norms[m](self.embedding_dropout(self.item_embeddings(m, item_seq)))
            for m in (self.key_modality, self.query_modality)
        )
        key_time = query_time = None
        time_mask = real
        if self.is_time:
            timestamps = timestamps.to(key.dtype)  # float32 in training; float64 in equality tests
            if self.leak_target_timestamp:
                # Reproduces the official loader: the target's time sits right after the last item.
                at_target = (positions[None, :] == item_seq_len[:, None])
                timestamps = torch.where(at_target, target_timestamp.to(key.dtype)[:, None], timestamps)
                time_mask = real | at_target
            time_mask = time_mask.to(key.dtype)
            key_time = self.time_signal(timestamps, time_mask)
            query_time = self.time_signal(timestamps, time_mask)
        mask = time_mask.to(key.dtype)[:, None, :] if self.is_time else real.to(key.dtype)[:, None, :]

        for layer in self.layers:
            key, key_time, query, query_time = layer(key, key_time, query, query_time, mask)
        return self.gather_indexes(query, item_seq_len - 1)

    # ------------------------------------------------------------------ scoring
    def candidate_embeddings(self, items=None):
        """L2-normalised candidate embeddings per modality (eq. 19): no LayerNorm, no dropout."""
        return [F.normalize(self.item_embeddings(m, items), dim=-1) for m in (self.key_modality, self.query_modality)]

    def scores(self, user, items=None):
        """s(u, i) = (h_u . e^k_i + h_u . e^q_i) / temperature for all items or the given ones (B', n)."""
        key_table, query_table = self.candidate_embeddings(items)
        return (user @ key_table.transpose(0, 1) + user @ query_table.transpose(0, 1)) / self.temperature

    def _user(self, interaction):
        timestamps = target_time = None
        if self.is_time:
            timestamps = interaction[self.TIME_SEQ]
            if self.leak_target_timestamp:
                target_time = interaction[self.TIME_FIELD]
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], timestamps, target_time)

    def calculate_loss(self, interaction):
        user = self._user(interaction)
        targets = interaction[self.POS_ITEM_ID]
        if not self.in_batch_loss:
            return self.loss_fct(self.scores(user), targets)  # eq. 20: CE over all items (gradients need them at once)
        # eq. 21: in-batch CE, S_jk = s(u_j, target_k), positives on the diagonal.
        logits = self.scores(user, targets)
        if self.mask_in_batch_duplicates:
            # Another row with the same target item is not a negative (the official code counts it as one).
            same_item = targets[:, None] == targets[None, :]
            same_item.fill_diagonal_(False)
            logits = logits.masked_fill(same_item, float("-inf"))
        return self.loss_fct(logits, torch.arange(len(targets), device=targets.device))

    def predict(self, interaction):
        user = self._user(interaction)
        key_table, query_table = self.candidate_embeddings(interaction[self.ITEM_ID])
        return ((user * key_table).sum(-1) + (user * query_table).sum(-1)) / self.temperature

    def full_sort_predict(self, interaction):
        return self.scores_in_item_chunks(self._user(interaction), self.scores)
