"""FMRLRec: full-scale Matryoshka LRU recommender (Wang et al., "Train Once, Deploy Anywhere:
Matryoshka Representation Learning for Multimodal Recommendation", 2024).

Items are represented by one linear projection of their concatenated frozen features (paper
eq. 7), or by a learned ID embedding when ``modalities: []``. A stack of pre-LN blocks
(LRU + gated SiLU FFN, residuals) encodes the sequence. Every 2-D weight is an fMRL operator and
every LayerNorm is per chunk, so for each size ``s`` in ``mrl_sizes`` the first ``s`` dims of
every hidden state are exactly those of a standalone size-``s`` model; ``extract_submodel``
builds that model with smaller tensors. Training optimises all sizes at once (eq. 14); RecBole's
``full_sort_predict`` and validation use the largest size, ``full_sort_predict_per_size`` scores
every size from one encoding. Because the LRU is a linear recurrence, ``encode_history`` +
``step`` score the next item after one more interaction in O(1) per step (paper eq. 8).

Padding: RecBole right-pads sequences; the recurrence is causal, so padding positions come after
every real position and never influence it.
Missing features: a missing item's row is zero, so it is represented by the other modalities
(and the projection bias).
"""

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.model.abstract import MultimodalSequentialRecommender
from recbole_mm.model.layers.lru import LRU
from recbole_mm.model.layers.matryoshka import (
    MatryoshkaLayerNorm,
    MatryoshkaLinear,
    check_nested_sizes,
    nested_state_dict,
)
from recbole_mm.utils import RecboleMMError

SMALLEST_DEFAULT_SIZE = 8


def resolve_mrl_sizes(mrl_sizes: Optional[Sequence[int]], hidden_size: int) -> List[int]:
    """``mrl_sizes`` from config; ``~`` means powers of two from 8 up to ``hidden_size``."""
    if mrl_sizes is None:
        sizes, size = [], SMALLEST_DEFAULT_SIZE
        while size < hidden_size:
            sizes.append(size)
            size *= 2
        return sizes + [hidden_size]
    try:
        sizes = check_nested_sizes(mrl_sizes)
    except ValueError as error:
        raise RecboleMMError(f"FMRLRec: {error}") from None
    if sizes[-1] != hidden_size:
        raise RecboleMMError(
            f"FMRLRec: the largest of mrl_sizes {sizes} must equal hidden_size={hidden_size} "
            f"(set mrl_sizes: ~ for powers of two up to hidden_size)."
        )
    return sizes


class FMRLRecBlock(nn.Module):
    """Pre-LN block: ``h = x + LRU(LN(x))``, ``out = h + FFN(LN(h))`` with the gated FFN
    ``W2(SiLU(Wg x) * W1 x)`` (paper section 3.3.3); up/down weights of width ``ffn_expansion * s``
    are the rectangular fMRL cases of eq. 2."""

    def __init__(
        self,
        sizes: Sequence[int],
        ffn_expansion: int,
        r_min: float,
        r_max: float,
        hidden_dropout_prob: float,
        lru_dropout_prob: float,
        layer_norm_eps: float,
    ):
        super().__init__()
        inner_sizes = [ffn_expansion * s for s in sizes]
        self.lru_norm = MatryoshkaLayerNorm(sizes, eps=layer_norm_eps)
        self.lru = LRU(sizes, r_min=r_min, r_max=r_max)
        self.lru_dropout = nn.Dropout(lru_dropout_prob)
        self.ffn_norm = MatryoshkaLayerNorm(sizes, eps=layer_norm_eps)
        self.ffn_gate = MatryoshkaLinear(sizes, inner_sizes)
        self.ffn_in = MatryoshkaLinear(sizes, inner_sizes)
        self.ffn_out = MatryoshkaLinear(inner_sizes, sizes)
        self.ffn_dropout = nn.Dropout(hidden_dropout_prob)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.ffn_gate(x)) * self.ffn_dropout(self.ffn_in(x))
        return self.ffn_dropout(self.ffn_out(hidden))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, d) -> (output (B, L, d), LRU states (B, L, d) complex)."""
        lru_output, states = self.lru(self.lru_norm(x), return_states=True)
        hidden = x + self.lru_dropout(lru_output)
        return hidden + self.feed_forward(self.ffn_norm(hidden)), states

    def step(self, x_t: torch.Tensor, state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One position: x_t (B, d), LRU state (B, d) complex -> (output (B, d), new state)."""
        lru_output, state = self.lru.step(self.lru_norm(x_t), state)
        hidden = x_t + self.lru_dropout(lru_output)
        return hidden + self.feed_forward(self.ffn_norm(hidden)), state


class FMRLRec(MultimodalSequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["loss_type"] != "CE":
            raise RecboleMMError("FMRLRec trains with full-softmax cross-entropy (paper eq. 14): set loss_type: CE.")
        self.hidden_size = int(config["hidden_size"])
        self.mrl_sizes = resolve_mrl_sizes(config["mrl_sizes"], self.hidden_size)
        ffn_expansion = int(config["ffn_expansion"])
        if ffn_expansion < 1:
            raise RecboleMMError(f"FMRLRec: ffn_expansion must be a positive integer, got {ffn_expansion}.")

        if self.modalities:
            # eq. 7: one shared projection of [text ; image ; ...] for inputs and the scoring table
            self.feature_projection = nn.Linear(sum(self.feature_dims.values()), self.hidden_size)
        else:
            self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
            nn.init.normal_(self.item_embedding.weight, std=config["initializer_range"])
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        self.input_dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.blocks = nn.ModuleList(
            FMRLRecBlock(
                self.mrl_sizes,
                ffn_expansion=ffn_expansion,
                r_min=config["lru_r_min"],
                r_max=config["lru_r_max"],
                hidden_dropout_prob=config["hidden_dropout_prob"],
                lru_dropout_prob=config["lru_dropout_prob"],
                layer_norm_eps=config["layer_norm_eps"],
            )
            for _ in range(int(config["n_layers"]))
        )
        self.loss_fct = nn.CrossEntropyLoss()

    # ----- item representations and encoder -------------------------------------------------
    def item_table(self) -> torch.Tensor:
        """(n_items, d): input embeddings and scoring table, recomputed from the frozen features."""
        if self.modalities:
            return self.projected_features(self.feature_projection)
        return self.item_embedding.weight

    def encode(
        self, item_seq: torch.Tensor, item_table: Optional[torch.Tensor] = None
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Hidden states of every position: ([input, after block 1, ...], [LRU states per block])."""
        item_table = self.item_table() if item_table is None else item_table
        hidden = self.input_dropout(item_table[item_seq])
        hidden_states, lru_states = [hidden], []
        for block in self.blocks:
            hidden, states = block(hidden)
            hidden_states.append(hidden)
            lru_states.append(states)
        return hidden_states, lru_states

    def forward(self, item_seq, item_seq_len, item_table=None):
        """(B, d): the representation after the last real item of each sequence."""
        hidden_states, _ = self.encode(item_seq, item_table)
        return self.gather_indexes(hidden_states[-1], item_seq_len - 1)

    def scores_per_size(self, seq_output: torch.Tensor, item_table: torch.Tensor) -> List[torch.Tensor]:
        """Scores of the sub-model of every size: ``x[:, :s] @ E[:, :s]^T`` (paper eq. 13, sliced)."""
        return [seq_output[:, :s] @ item_table[:, :s].transpose(0, 1) for s in self.mrl_sizes]

    # ----- RecBole interface ------------------------------------------------------------------
    def calculate_loss(self, interaction):
        item_table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        target = interaction[self.POS_ITEM_ID]
        losses = [self.loss_fct(logits, target) for logits in self.scores_per_size(seq_output, item_table)]
        return torch.stack(losses).mean()  # eq. 14, averaged over sizes

    def predict(self, interaction):
        item_table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        return (seq_output * item_table[interaction[self.ITEM_ID]]).sum(dim=-1)

    def full_sort_predict(self, interaction):
        item_table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        return seq_output @ item_table.transpose(0, 1)

    def full_sort_predict_per_size(self, interaction) -> torch.Tensor:
        """(n_sizes, B, n_items): every size's full-sort scores from one encoding of the batch."""
        item_table = self.item_table()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        return torch.stack(self.scores_per_size(seq_output, item_table))

    # ----- incremental inference (recurrent mode) -----------------------------------------------
    def encode_history(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, item_table: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Encode histories in parallel; return (representation after the last item, per-block
        LRU states at that position) to continue with ``step``."""
        hidden_states, lru_states = self.encode(item_seq, item_table)
        last = item_seq_len - 1
        states = [self.gather_indexes(s, last) for s in lru_states]
        return self.gather_indexes(hidden_states[-1], last), states

    def step(
        self,
        item_ids: torch.Tensor,
        states: Optional[List[torch.Tensor]] = None,
        item_table: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Append one interaction per user (item_ids: (B,)); O(1) in the history length.
        ``states=None`` starts an empty history. Returns (representation (B, d), new states);
        ``representation @ item_table().T`` scores the next item."""
        item_table = self.item_table() if item_table is None else item_table
        hidden = self.input_dropout(item_table[item_ids])
        states = states if states is not None else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            hidden, state = block.step(hidden, state)
            new_states.append(state)
        return hidden, new_states


def submodel_config(config, size: int):
    """Copy of ``config`` describing the standalone size-``size`` model of an FMRLRec."""
    sizes = resolve_mrl_sizes(config["mrl_sizes"], int(config["hidden_size"]))
    if size not in sizes:
        raise RecboleMMError(f"FMRLRec: size {size} is not one of the trained sizes mrl_sizes={sizes}.")
    small = copy.deepcopy(config)
    small["hidden_size"] = size
    small["mrl_sizes"] = [s for s in sizes if s <= size]
    return small


def extract_submodel(model: FMRLRec, config, dataset, size: int) -> FMRLRec:
    """Standalone size-``size`` FMRLRec (smaller tensors, no masks) whose every hidden state is
    the first ``size`` dims of ``model``'s (paper section 3.2, last paragraph)."""
    small = FMRLRec(submodel_config(config, size), dataset)
    small.load_state_dict(nested_state_dict(small, model.state_dict()))
    return small.to(next(model.parameters()).device)
