"""MMESID (MME-SID, Wang et al. CIKM'25): an LLM sequential recommender whose item tokens combine
multimodal embeddings and multimodal semantic IDs, scored by frequency-aware fusion.

This class is the fine-tuning stage (paper Sec. 4.3). Its two inputs come from the earlier stages
run by ``recbole_mm.quick_start.mmesid`` (``quick_start.run('MMESID', ...)`` runs all of them):
``mmesid_collab_file`` (collaborative item embeddings E_c from SASRec) and ``mmesid_sid_file``
(semantic IDs and codebooks from the MM-RQ-VAE, ``recbole_mm.model.layers.rqvae``).

Per history item j (eq. 16):
    e_j = f_MLP([W_c SG(E_c)_j + b_c, Σ_l E_SID_c^l, W_t SG(E_t)_j + b_t, Σ_l E_SID_t^l, W_v ..., Σ_l E_SID_v^l])
with the SID tables initialised from the trained codebooks (``sid_init: codebook``; ``random`` is
the paper's MME-SID-random ablation). A modality an item lacks contributes zeros.
Prompt = text before the items + one spliced vector per history item + text after them
(``prompt_template``: ``authors_code`` what the authors' ``utils/prompter.py`` sends, ``llama3`` the
Llama-3 chat template of their README, ``plain`` = ``instruction`` + ``response_header``); the user
state h is the LLM's last hidden state at the last real position.
Score of item i (eqs. 17–18):
    q''_i = minmax(log(q_i + 1)),  w_i = softmax(g(q''_i) / fusion_temperature)
with g the authors' five-layer MLP (``fusion_mlp: authors``) or one hidden layer (``one_hidden``).
    ŷ_i = w_x,i (h · E_x,i) + Σ_j w_j,i (h · (W_j SG(E_j)_i + b_j))
with E_x a new target-item table. Loss: ``loss_type: CE`` (full softmax, the authors' released code)
or ``BCE`` with ``bce_negatives`` uniformly sampled negatives (the paper's text).
"""
import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.abstract import MultimodalSequentialRecommender
from recbole_mm.model.layers.llm import backbone_from_config, build_prompt_ids
from recbole_mm.data.item_tables import COLLAB, load_collaborative_table, load_semantic_ids
from recbole_mm.utils import RecboleMMError

SID_INITS = ("codebook", "random")
FUSION_MLPS = ("authors", "one_hidden")
PROMPT_TEMPLATES = ("authors_code", "llama3", "plain")
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_ASSISTANT_HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
LLAMA3_SYSTEM_AND_USER_HEADER = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                 "You are a helpful AI assistant for recommendations<|eot_id|>"
                                 "<|start_header_id|>user<|end_header_id|>\n\n")


def prompt_texts(template, instruction, response_header):
    """(text before the history items, text after them) of a ``prompt_template``."""
    if template == "plain":
        return instruction, response_header
    if template == "llama3":  # the authors' README and dataset/llama3.json
        return LLAMA3_SYSTEM_AND_USER_HEADER + instruction, LLAMA3_ASSISTANT_HEADER
    if template == "authors_code":
        # utils/prompter.py replaces the json template by "<|begin_of_text|>{{ <instruction>", which
        # str.format turns into a literal "{ "
        return "<|begin_of_text|>{ " + instruction, LLAMA3_ASSISTANT_HEADER
    raise RecboleMMError(f"MMESID: prompt_template must be one of {PROMPT_TEMPLATES}, got {template!r}.")


def fusion_mlp(kind, hidden_size, bottleneck_size, n_weights):
    """g of eq. 18: frequency feature (..., 1) -> one weight logit per score table."""
    if kind == "authors":
        # model.py: mlp_head = Linear(1,64) GELU Linear(64,10); mlp_meta_embedding = Linear(10,64, no bias) GELU Linear(64,4)
        return nn.Sequential(
            nn.Linear(1, hidden_size), nn.GELU(), nn.Linear(hidden_size, bottleneck_size),
            nn.Linear(bottleneck_size, hidden_size, bias=False), nn.GELU(), nn.Linear(hidden_size, n_weights),
        )
    if kind == "one_hidden":
        return nn.Sequential(nn.Linear(1, hidden_size), nn.GELU(), nn.Linear(hidden_size, n_weights))
    raise RecboleMMError(f"MMESID: fusion_mlp must be one of {FUSION_MLPS}, got {kind!r}.")


class MMESID(MultimodalSequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_type = config["loss_type"]
        if self.loss_type not in ("CE", "BCE"):
            raise RecboleMMError(f"MMESID: loss_type must be CE or BCE, got {self.loss_type!r}.")
        self.bce_negatives = int(config["bce_negatives"] or 1)
        self.sid_init = config["sid_init"]
        if self.sid_init not in SID_INITS:
            raise RecboleMMError(f"MMESID: sid_init must be one of {SID_INITS}, got {self.sid_init!r}.")
        self.fusion_temperature = float(config["fusion_temperature"])
        self.use_fusion = bool(config["fusion"])

        # Frozen inputs: E_c beside the feature hook's E_t / E_v, and the items' semantic IDs.
        self.register_feature_table(COLLAB, *load_collaborative_table(config["mmesid_collab_file"], dataset))
        self.channels = [COLLAB, *self.modalities]
        semantic_ids = load_semantic_ids(config["mmesid_sid_file"], dataset, self.channels)
        for name in self.channels:
            self.register_buffer(f"sid_{name}", semantic_ids[name]["codes"], persistent=False)

        self.prompt_template = config["prompt_template"]
        before_items, after_items = prompt_texts(self.prompt_template, config["instruction"], config["response_header"])
        special = LLAMA3_SPECIAL_TOKENS if self.prompt_template != "plain" else ()
        # the word-level tokenizer's vocabulary is built from raw text; spacing the special tokens out keeps
        # punctuation next to them ("<|begin_of_text|>{") a word of its own
        vocab_texts = [before_items, after_items]
        for token in special:
            vocab_texts = [text.replace(token, " ") for text in vocab_texts]
        self.llm = backbone_from_config(config, vocab_texts=vocab_texts, extra_special_tokens=special)
        hidden = self.llm.hidden_size
        self.prompt_prefix = self.llm.encode(before_items)
        self.prompt_suffix = self.llm.encode(after_items)

        self.projections = nn.ModuleDict({name: nn.Linear(self.feature_dims[name], hidden) for name in self.channels})
        self.sid_tables = nn.ParameterDict()
        for name in self.channels:
            codebooks = semantic_ids[name]["codebooks"]
            if self.sid_init == "codebook" and codebooks.shape[-1] != hidden:
                raise RecboleMMError(
                    f"MMESID: the {name} codebooks are {codebooks.shape[-1]}-d but the LLM hidden size is {hidden}; "
                    "codebook init needs them equal. Re-run the tokenizer stage with rqvae_latent_dim: ~ (= LLM "
                    "hidden size) or set sid_init: random."
                )
            table = codebooks.clone().float() if self.sid_init == "codebook" else torch.randn(
                *codebooks.shape[:2], hidden) * float(config["initializer_range"])
            self.sid_tables[name] = nn.Parameter(table)
        n_channels = len(self.channels)
        # f_MLP of eq. 16, sizes and activations of the authors' code (6H -> 3H -> ReLU -> H, GELU).
        self.item_mlp = nn.Sequential(
            nn.Linear(2 * n_channels * hidden, n_channels * hidden), nn.ReLU(),
            nn.Linear(n_channels * hidden, hidden), nn.GELU(),
        )
        self.target_item_embedding = nn.Embedding(self.n_items, hidden)
        nn.init.uniform_(self.target_item_embedding.weight, -hidden**-0.5, hidden**-0.5)
        self.fusion_mlp = fusion_mlp(config["fusion_mlp"], int(config["fusion_hidden_size"]),
                                     int(config["fusion_bottleneck_size"]), 1 + n_channels)
        self.register_buffer("item_frequency_feature", normalised_log_frequency(dataset, self.n_items),
                             persistent=False)

    # ---- item side --------------------------------------------------------------------------
    def semantic_id_embeddings(self, name, items):
        """Σ_l E_SID^l of the items' codes in modality ``name`` (..., H)."""
        codes = getattr(self, f"sid_{name}")[items]
        table = self.sid_tables[name]
        return table[torch.arange(table.shape[0], device=codes.device), codes].sum(dim=-2)

    def projected_features(self, name, items=None):
        """W_j SG(E_j) + b_j for ``items`` (all items when None)."""
        features = self.feature_table(name) if items is None else self.feature_table(name)[items]
        return self.projections[name](features)

    def item_input_embeddings(self, items):
        """LLM input vector per item (eq. 16); ``items`` any shape -> (..., H)."""
        parts = []
        for name in self.channels:
            present = self.feature_mask(name)[items].unsqueeze(-1).to(torch.float32)
            parts += [self.projected_features(name, items) * present, self.semantic_id_embeddings(name, items) * present]
        return self.item_mlp(torch.cat(parts, dim=-1))

    def fusion_weights(self, items=None):
        """(n_items or items.shape, 1 + channels) weights (w_x, w_c, w_t, w_v) summing to 1 (eq. 18).
        A channel the item lacks (no image) gets weight 0 and the others share its weight in proportion:
        its table row would be the projection's bias alone, a score the item's content never set.
        (A softmax over the present channels: the same as renormalising, without underflow at small
        temperatures.)"""
        frequency = self.item_frequency_feature if items is None else self.item_frequency_feature[items]
        present = torch.cat([torch.ones_like(frequency, dtype=torch.bool)] + [
            (self.feature_mask(name) if items is None else self.feature_mask(name)[items]).unsqueeze(-1)
            for name in self.channels], dim=-1)
        if self.use_fusion:
            logits = self.fusion_mlp(frequency) / self.fusion_temperature
        else:
            logits = torch.zeros(present.shape, device=frequency.device)
        return torch.softmax(logits.masked_fill(~present, float("-inf")), dim=-1)

    def scoring_tables(self, items=None):
        """[E_x, W_c E_c + b_c, W_t E_t + b_t, ...] rows for ``items`` (all items when None)."""
        target = self.target_item_embedding.weight if items is None else self.target_item_embedding(items)
        return [target] + [self.projected_features(name, items) for name in self.channels]

    # ---- user side --------------------------------------------------------------------------
    def forward(self, item_seq, item_seq_len):
        """User state h (B, H): last hidden state of instruction + history item vectors + header."""
        item_mask = torch.arange(item_seq.shape[1], device=item_seq.device)[None, :] < item_seq_len[:, None]
        input_ids, attention_mask = build_prompt_ids(
            self.prompt_prefix, item_seq_len, self.prompt_suffix, self.llm.placeholder_id,
            self.llm.tokenizer.pad_token_id, device=item_seq.device,
        )
        # only real history items go through eq. 16 (RecBole pads every sequence to MAX_ITEM_LIST_LENGTH)
        item_vectors = self.item_input_embeddings(item_seq[item_mask])
        history = item_vectors.new_zeros(*item_seq.shape, item_vectors.shape[-1])
        history[item_mask] = item_vectors
        inputs_embeds = self.llm.build_inputs_embeds(input_ids, history, item_mask)
        return self.llm.last_hidden_state(inputs_embeds, attention_mask).float()

    def full_scores(self, user_state):
        weights = self.fusion_weights()
        scores = 0
        for channel, table in enumerate(self.scoring_tables()):
            scores = scores + weights[:, channel] * (user_state @ table.t())
        return scores

    def item_scores(self, user_state, items):
        """Scores of ``items`` (B, K) for each row's user state (B, H) -> (B, K)."""
        weights = self.fusion_weights(items)
        scores = 0
        for channel, table in enumerate(self.scoring_tables(items)):
            scores = scores + weights[..., channel] * (table @ user_state.unsqueeze(-1)).squeeze(-1)
        return scores

    # ---- RecBole interface ------------------------------------------------------------------
    def calculate_loss(self, interaction):
        user_state = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        positives = interaction[self.POS_ITEM_ID]
        if self.loss_type == "CE":
            return F.cross_entropy(self.full_scores(user_state), positives)
        negatives = sample_negatives(positives, self.n_items, self.bce_negatives)
        scores = self.item_scores(user_state, torch.cat([positives[:, None], negatives], dim=1))
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(scores, labels)

    def predict(self, interaction):
        user_state = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.item_scores(user_state, interaction[self.ITEM_ID][:, None]).squeeze(-1)

    def full_sort_predict(self, interaction):
        return self.full_scores(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))

    # ---- analysis -----------------------------------------------------------------------------
    @torch.no_grad()
    def item_input_table(self, batch_size=1024):
        """(n_items, H): every item's LLM input vector (the matrix whose spectrum Fig. 3b shows)."""
        items = torch.arange(self.n_items, device=self.target_item_embedding.weight.device)
        return torch.cat([self.item_input_embeddings(chunk) for chunk in items.split(batch_size)])

    @torch.no_grad()
    def quantized_table(self, name):
        """(n_items, H): Σ_l E_SID^l per item for modality ``name`` as currently trained."""
        items = torch.arange(self.n_items, device=self.target_item_embedding.weight.device)
        return self.semantic_id_embeddings(name, items)


def normalised_log_frequency(dataset, n_items):
    """q''_i = minmax(log(q_i + 1)) (eq. 17), q_i = times item i is a target in the training split."""
    counts = torch.bincount(dataset.inter_feat[dataset.iid_field].long(), minlength=n_items)[:n_items].float()
    log_counts = torch.log(counts + 1)
    span = (log_counts.max() - log_counts.min()).clamp(min=1e-12)
    return ((log_counts - log_counts.min()) / span).unsqueeze(-1)


def sample_negatives(positives, n_items, n_negatives):
    """Uniform negatives from items 1..n_items-1, never equal to the row's positive."""
    negatives = torch.randint(1, n_items - 1, (positives.shape[0], n_negatives), device=positives.device)
    # shift draws at or above the positive by one: uniform over the other n_items - 2 real items
    return negatives + (negatives >= positives[:, None]).long()
