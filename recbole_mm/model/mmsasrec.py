"""MMSASRec: SASRec over items represented by their features ("SASRec (T+V)" in the papers).

Item representation ``e_i = W [f^1_i ; ... ; f^M_i] + b (+ ID embedding)``: one learned projection of
the concatenated frozen feature tables, used both for the input sequence and as the scoring
table, so every item (also one never seen in training) is scored through its features.
A missing feature row is zero, so the item falls back to the other modalities (and the bias).
"""
import torch
from recbole.model.layers import TransformerEncoder
from torch import nn

from recbole_mm.model.abstract import MultimodalSequentialRecommender
from recbole_mm.utils import RecboleMMError


class MMSASRec(MultimodalSequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.use_id_embedding = config["use_id_embedding"]
        if config["loss_type"] != "CE":
            raise RecboleMMError("MMSASRec trains with full-softmax cross-entropy: set loss_type: CE.")
        if not self.modalities and not self.use_id_embedding:
            raise RecboleMMError("MMSASRec needs at least one modality or use_id_embedding: True.")

        if self.modalities:
            self.feature_projection = nn.Linear(sum(self.feature_dims.values()), self.hidden_size)
            self.feature_dropout = nn.Dropout(config["feature_dropout_prob"])
        if self.use_id_embedding:
            self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = TransformerEncoder(
            n_layers=config["n_layers"],
            n_heads=config["n_heads"],
            hidden_size=self.hidden_size,
            inner_size=config["inner_size"],
            hidden_dropout_prob=config["hidden_dropout_prob"],
            attn_dropout_prob=config["attn_dropout_prob"],
            hidden_act=config["hidden_act"],
            layer_norm_eps=self.layer_norm_eps,
        )
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def item_representations(self):
        """(n_items, hidden): the scoring table, recomputed each forward from the frozen features."""
        table = 0
        if self.modalities:
            table = self.projected_features(lambda features: self.feature_projection(self.feature_dropout(features)))
        if self.use_id_embedding:
            table = table + self.item_embedding.weight
        return table

    def forward(self, item_seq, item_seq_len, item_table=None):
        item_table = self.item_representations() if item_table is None else item_table
        position_ids = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        input_emb = item_table[item_seq] + self.position_embedding(position_ids)
        input_emb = self.dropout(self.LayerNorm(input_emb))
        attention_mask = self.get_attention_mask(item_seq)
        output = self.trm_encoder(input_emb, attention_mask, output_all_encoded_layers=True)[-1]
        return self.gather_indexes(output, item_seq_len - 1)

    def calculate_loss(self, interaction):
        item_table = self.item_representations()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        logits = seq_output @ item_table.transpose(0, 1)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        item_table = self.item_representations()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        return (seq_output * item_table[interaction[self.ITEM_ID]]).sum(dim=-1)

    def full_sort_predict(self, interaction):
        item_table = self.item_representations()
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], item_table)
        return seq_output @ item_table.transpose(0, 1)
