"""Speeder: compressed multimodal item tokens for an LLM recommender (Zhong et al., 2025).

Spec: the paper, arXiv:2511.05885 (no public code exists). One forward:

1. MRC (``layers/mome.py``): every item in the batch becomes one vector in the LLM's hidden size
   from its text / image / ID-sequence features (eqs. 1-10).
2. SPAE: PPL adds learnable absolute position vectors p_1..p_n to the n history items (eqs. 15-17,
   dynamic truncation); PPT adds auxiliary yes/no prompts about three history items (eqs. 13-14)
   to a ``ppt_rate`` fraction of the training rows.
3. Hybrid prompt: instruction words + per item an index token and one ``[item]`` slot holding its
   vector; the answer is the target's candidate label (one token) followed by end-of-sequence.
   Loss: LM cross-entropy on the answer tokens (eq. 19).
4. MPO: three training stages (``training_stages`` / ``enter_stage``, run by ``MMTrainer``):
   text only -> text + image -> text + image + ID, each stage training exactly the parameters the
   paper lists (see ``enter_stage``).

Evaluation ranks the target against the fixed candidate set of the protocol
(``recbole_mm.data.candidates``): ``inference: constrained`` scores each candidate by the
next-token logit of its label (the LLM's greedy first answer token restricted to valid answers);
``inference: generate`` decodes greedily and parses the reply (a reply naming no single
candidate is an invalid answer, which is what ValidRatio counts). ``full_sort_predict`` returns
scores that are finite only on the candidates; evaluate with ``metrics: [HR, ValidRatio, VHR]``.
"""

import copy
import hashlib
import json
import os
import re

import numpy as np
import torch
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_mm.data.candidates import CandidateSampler, position_proxy_batch
from recbole_mm.evaluator.candidate_metrics import CANDIDATE_METRICS, register_candidate_metrics
from recbole_mm.evaluator.candidate_protocol import candidate_source_from_config
from recbole_mm.model.abstract import MultimodalSequentialRecommender
from recbole_mm.model.layers.llm import ITEM_PLACEHOLDER, backbone_from_config, pad_rows
from recbole_mm.model.layers.mome import MultimodalItemCompressor
from recbole_mm.trainer import TrainingStage
from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.atomic import torch_save_atomic

ID_MODALITY = "id"
INFERENCE_MODES = ("constrained", "generate")
ANSWER_HEADS = ("label", "pointer")
ID_FEATURE_SOURCES = ("sasrec", "table", "none")

register_candidate_metrics()


class HybridPrompt:
    """Token ids of Speeder's prompts (paper Fig. 3), built from separately encoded segments.

    Recommendation: ``<s> history-head {1 [item] 2 [item] ...} candidates-head {A [item] B [item]
    ...} question`` -> answer ``<label> </s>``. PPT: the same history, then ``first [item] second
    [item] third [item]`` and a yes/no question. History index words are positions 1..n; candidate
    labels must be single tokens (they are the one-token answers).
    """

    HISTORY_HEAD = "the user interacted with these items in order :"
    CANDIDATES_HEAD = ". candidates :"
    QUESTION = ". which candidate will the user interact with next ? answer :"
    PPT_SLOTS = ("first", "second", "third")
    PPT_QUESTION = ". is the first item at most as far from the second item in the history as the third item is ? answer :"
    PPT_ANSWERS = ("no", "yes")

    def __init__(self, tokenizer, labels, max_history):
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.placeholder = tokenizer.convert_tokens_to_ids(ITEM_PLACEHOLDER)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.history_head = self.encode(self.HISTORY_HEAD)
        self.candidates_head = self.encode(self.CANDIDATES_HEAD)
        self.question = self.encode(self.QUESTION)
        self.ppt_slots = [self.encode(word) for word in self.PPT_SLOTS]
        self.ppt_question = self.encode(self.PPT_QUESTION)
        self.position_words = [self.encode(str(i)) for i in range(1, max_history + 1)]
        self.label_ids = [self.single_token(label) for label in self.labels]
        self.ppt_answer_ids = [self.single_token(word) for word in self.PPT_ANSWERS]

    @classmethod
    def vocabulary_texts(cls, labels, max_history):
        """Every word a prompt can contain (the offline word-level tokenizer is built over these)."""
        return [cls.HISTORY_HEAD, cls.CANDIDATES_HEAD, cls.QUESTION, cls.PPT_QUESTION, " ".join(cls.PPT_SLOTS),
                " ".join(cls.PPT_ANSWERS), " ".join(labels), " ".join(str(i) for i in range(1, max_history + 1))]

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def single_token(self, word):
        ids = self.encode(word)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise RecboleMMError(
                f"answer word {word!r} is {len(ids)} token(s) {ids} for this tokenizer; Speeder answers with one "
                "token: choose candidate_labels that the tokenizer keeps whole (e.g. capital letters)."
            )
        return ids[0]

    def history_ids(self, length):
        ids = self.bos + self.history_head
        for position in range(length):
            ids += self.position_words[position] + [self.placeholder]
        return ids

    def recommendation(self, history_length, n_candidates):
        """(prompt ids, number of item slots)."""
        ids = self.history_ids(history_length) + self.candidates_head
        for label in self.label_ids[:n_candidates]:
            ids += [label, self.placeholder]
        return ids + self.question, history_length + n_candidates

    def position_proxy(self, history_length):
        ids = self.history_ids(history_length)
        for slot in self.ppt_slots:
            ids += slot + [self.placeholder]
        return ids + self.ppt_question, history_length + len(self.ppt_slots)

    def parse_answer(self, generated_ids, n_candidates):
        """Candidate slot named by a generated reply, or -1 when it names none or several."""
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=True).lower()
        words = set(re.findall(r"\w+", text))
        named = [slot for slot, label in enumerate(self.labels[:n_candidates]) if label.lower() in words]
        return named[0] if len(named) == 1 else -1


def most_recent_items(histories, lengths, n_max):
    """Keep each right-padded row's last ``n_max`` items (benchmark-mode files can hold longer
    histories than MAX_ITEM_LIST_LENGTH): (B, min(width, n_max)) ids and the new lengths."""
    if histories.shape[1] <= n_max:
        return histories, lengths
    start = (lengths - n_max).clamp(min=0)
    index = (start.unsqueeze(1) + torch.arange(n_max, device=histories.device)).clamp(max=histories.shape[1] - 1)
    new_lengths = lengths.clamp(max=n_max)
    kept = histories.gather(1, index)
    return kept.masked_fill(torch.arange(n_max, device=histories.device) >= new_lengths.unsqueeze(1), 0), new_lengths


def truncated_position_prompt(position_table, lengths, width):
    """PPL_i = truncate(PPL, n_i) (eq. 16), laid out on right-padded rows: (B, width, H), row b =
    p_1..p_{n_b} then zeros."""
    positions = torch.arange(width, device=position_table.device)
    keep = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(position_table.dtype)
    return position_table[:width].unsqueeze(0) * keep.unsqueeze(-1)


class Speeder(MultimodalSequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        modes = config["eval_args"]["mode"]
        if any(mode != "full" for mode in (modes.values() if isinstance(modes, dict) else [modes])):
            raise RecboleMMError("Speeder ranks its candidate sets inside full-sort evaluation: set eval_args.mode: full.")
        candidate_metric_names = {metric.__name__.lower() for metric in CANDIDATE_METRICS}
        ranking_metrics = [m for m in config["metrics"] if m.lower() not in candidate_metric_names]
        if ranking_metrics:
            # its scores are finite on the m candidates only, so e.g. Recall@10 over 5 candidates is always 1
            raise RecboleMMError(
                f"Speeder answers on its candidate sets, so metrics {ranking_metrics} would be meaningless: use "
                "metrics: [HR, ValidRatio, VHR] with topk: [1] (a table: --candidate_protocol=True "
                "--metrics=[HR,ValidRatio,VHR] --topk=[1] --valid_metric=VHR@1 ranks every model on the same sets)."
            )
        self.USER_ID = config["USER_ID_FIELD"]
        self.num_candidates = int(config["num_candidates"])
        self.ppt_rate = float(config["ppt_rate"])
        self.use_ppl = bool(config["use_ppl"])
        self.candidate_slot_identity = bool(config["candidate_slot_identity"])
        self.inference = config["inference"]
        self.max_new_tokens = int(config["max_new_tokens"])
        if self.inference not in INFERENCE_MODES:
            raise RecboleMMError(f"inference: {self.inference!r}; choose one of {', '.join(INFERENCE_MODES)}.")
        self.answer_head = config["answer_head"] or ("label" if config["llm_path"] else "pointer")
        if self.answer_head not in ANSWER_HEADS:
            raise RecboleMMError(f"answer_head: {self.answer_head!r}; choose one of {', '.join(ANSWER_HEADS)}.")
        if self.answer_head == "pointer" and self.inference == "generate":
            raise RecboleMMError(
                "answer_head: pointer names exactly one candidate by construction, so free generation (and "
                "ValidRatio) mean nothing: use inference: constrained, or answer_head: label to generate."
            )
        labels = list(config["candidate_labels"])
        if len(labels) < self.num_candidates:
            raise RecboleMMError(
                f"num_candidates={self.num_candidates} but only {len(labels)} candidate_labels: add labels."
            )
        self.candidate_sampler = CandidateSampler(self.n_items, self.num_candidates, int(config["candidate_seed"]))
        self.evaluation_source = candidate_source_from_config(config, dataset)  # the sampler, or candidate_file's sets
        self.ppt_rng = np.random.default_rng(int(config["seed"]))

        input_sizes = {name: self.feature_dims[name] for name in self.modalities}
        self._setup_id_features(config, dataset, input_sizes)
        if config["feature_centring"]:
            for modality in input_sizes:
                self._centre_feature_table(modality)
        self.available_modalities = list(input_sizes)
        self.stage_modalities, self.stage_epochs = self._read_stages(config)
        self.active_modalities = list(self.stage_modalities[-1])

        self.llm = backbone_from_config(config, vocab_texts=HybridPrompt.vocabulary_texts(labels, self.max_seq_length))
        self.prompt = HybridPrompt(self.llm.tokenizer, labels[: self.num_candidates], self.max_seq_length)
        llm_hidden = self.llm.hidden_size
        self.compressor = MultimodalItemCompressor(
            input_sizes,
            hidden_size=int(config["mome_hidden_size"]),
            output_size=llm_hidden,
            n_heads=int(config["mome_n_heads"]),
            inner_size=int(config["mome_inner_size"]),
            modality_layers=int(config["mome_modality_layers"]),
            multimodal_layers=int(config["mome_multimodal_layers"]),
            dropout=float(config["mome_dropout"]),
            gate=config["gate"],
        )
        # PPL (eq. 15): n_max = the longest history a prompt can hold.
        self.position_prompt = nn.Parameter(torch.randn(self.max_seq_length, llm_hidden) * config["ppl_init_std"])
        if self.answer_head == "pointer":
            self.pointer = nn.Linear(llm_hidden, llm_hidden, bias=False)
            nn.init.eye_(self.pointer.weight)  # starts as plain state similarity
        self.llm_trainable_names = {n for n, p in self.llm.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ configuration
    def _setup_id_features(self, config, dataset, input_sizes):
        """The sequential modality: a SASRec item table trained here, a declared table, or none."""
        source = config["id_features"]
        if source not in ID_FEATURE_SOURCES:
            raise RecboleMMError(f"id_features: {source!r}; choose one of {', '.join(ID_FEATURE_SOURCES)}.")
        if source == "table" and ID_MODALITY not in self.modalities:
            raise RecboleMMError(
                f"id_features: table reads the feature table '{ID_MODALITY}': declare feature_tables.{ID_MODALITY} "
                f"(an item x d file of sequential item embeddings) and add '{ID_MODALITY}' to modalities."
            )
        if source == "sasrec":
            if ID_MODALITY in self.modalities:
                raise RecboleMMError(
                    f"modalities already has a '{ID_MODALITY}' table: set id_features: table to use it, or remove it."
                )
            table = sasrec_item_table(config, dataset)
            mask = torch.ones(self.n_items, dtype=torch.bool)
            mask[0] = False
            self.register_feature_table(ID_MODALITY, table, mask)
            input_sizes[ID_MODALITY] = table.shape[1]

    def _centre_feature_table(self, modality):
        """Frozen encoder features share a large common direction (item tokens start nearly parallel):
        subtract the mean over the items that have the modality and scale to unit RMS per entry,
        so the compressor starts from what tells items apart. Items without the modality stay zero."""
        table, mask = self.feature_table(modality), self.feature_mask(modality)
        centred = table[mask] - table[mask].mean(dim=0)
        scaled = torch.zeros_like(table)
        scaled[mask] = centred / centred.pow(2).mean().sqrt().clamp_min(1e-12)
        self.register_feature_table(modality, scaled, mask)

    def _read_stages(self, config):
        stages = [list(m) for m in config["stage_modalities"]]
        epochs = [int(e) for e in config["stage_epochs"]]
        if len(stages) != len(epochs) or not stages:
            raise RecboleMMError(
                f"stage_modalities ({len(stages)} stages) and stage_epochs ({len(epochs)} entries) must have the "
                "same, non-zero length."
            )
        for stage in stages:
            missing = [m for m in stage if m not in self.available_modalities]
            if missing or not stage:
                raise RecboleMMError(
                    f"stage_modalities entry {stage} uses {missing or 'nothing'}; available modalities are "
                    f"{self.available_modalities} (modalities: {self.modalities}, id_features: {config['id_features']})."
                )
        return stages, epochs

    # ------------------------------------------------------------------ MPO (Sec. 2.5)
    def training_stages(self):
        return [
            TrainingStage(name=f"{k + 1}:{'+'.join(mods)}", epochs=epochs, options={"modalities": mods})
            for k, (mods, epochs) in enumerate(zip(self.stage_modalities, self.stage_epochs))
        ]

    def stage_trainable_parameters(self, modalities):
        """Stage 1 (text only): textual expert, A_t, A_f, PPL, LLM adapters. A stage that fuses several
        modalities also trains the shared MHSA / multimodal expert; the experts, adapters and gates of
        modalities outside the stage stay frozen (stage 2: sequential expert and A_s)."""
        params = [self.position_prompt, *self.compressor.output_adapter.parameters()]
        if self.answer_head == "pointer":
            params += list(self.pointer.parameters())
        params += [p for n, p in self.llm.named_parameters() if n in self.llm_trainable_names]
        for modality in modalities:
            params += self.compressor.modality_parameters(modality)
        if len(modalities) > 1:
            params += self.compressor.fusion_parameters()
        return params

    def enter_stage(self, stage):
        self.active_modalities = list(stage.options["modalities"])
        trainable = {id(p) for p in self.stage_trainable_parameters(self.active_modalities)}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    # ------------------------------------------------------------------ item tokens (MRC)
    def item_tokens(self, item_ids):
        """e^mm for any-shaped item ids, computed once per distinct item."""
        unique, inverse = torch.unique(item_ids, return_inverse=True)
        features = {m: self.feature_table(m)[unique] for m in self.active_modalities}
        present = {m: self.feature_mask(m)[unique] for m in self.active_modalities}
        return self.compressor(features, present)[inverse]

    # ------------------------------------------------------------------ prompts
    def _assemble(self, histories, lengths, extra_items, kind):
        """Prompt ids and spliced input embeddings for rows of (history, candidates or PPT triple)."""
        histories, lengths = most_recent_items(histories, lengths, self.max_seq_length)
        width = int(lengths.max())
        histories = histories[:, :width]
        tokens = self.item_tokens(torch.cat([histories, extra_items], dim=1))
        history_tokens, extra_tokens = tokens[:, :width], tokens[:, width:]
        if self.use_ppl:  # eq. 17: S^inter = S^mm + PPL_i
            history_tokens = history_tokens + truncated_position_prompt(self.position_prompt, lengths, width)
        if self.candidate_slot_identity and kind == "recommend":
            # a backbone without pretrained copy heads learns to point at a slot far sooner when the
            # slot itself carries its label's embedding (the CPU default; the paper's prompt has only "A [item]")
            label_ids = torch.tensor(self.prompt.label_ids[: extra_items.shape[1]], device=extra_tokens.device)
            extra_tokens = extra_tokens + self.llm.embed_tokens(label_ids).to(extra_tokens.dtype)
        rows = [
            self.prompt.recommendation(n, extra_items.shape[1])[0] if kind == "recommend" else self.prompt.position_proxy(n)[0]
            for n in lengths.tolist()
        ]
        slots = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        item_mask = torch.cat([slots, torch.ones_like(extra_items, dtype=torch.bool)], dim=1)
        return rows, torch.cat([history_tokens, extra_tokens], dim=1), item_mask

    def _inputs(self, rows, item_embeddings, item_mask):
        """Padded token ids, their embeddings with the [item] slots filled, and the attention mask."""
        input_ids, attention_mask = pad_rows(rows, self.prompt.pad, item_embeddings.device)
        return input_ids, self.llm.build_inputs_embeds(input_ids, item_embeddings, item_mask), attention_mask

    def _answer_loss(self, rows, item_embeddings, item_mask, answers):
        """Eq. 19: token-level cross-entropy on each row's answer (label/yes/no, then </s>)."""
        answer_tokens = torch.stack([answers, torch.full_like(answers, self.prompt.eos)], dim=1)
        starts = torch.tensor([len(row) for row in rows], device=answers.device)
        full_rows = [row + pair for row, pair in zip(rows, answer_tokens.tolist())]
        _, inputs_embeds, attention_mask = self._inputs(full_rows, item_embeddings, item_mask)
        states = self.llm.hidden_states(inputs_embeds, attention_mask)
        positions = torch.stack([starts - 1, starts], dim=1)  # the states that predict the answer tokens
        picked = states.gather(1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        logits = self.llm.lm_head(picked.to(self.llm.lm_head.weight.dtype)).float()
        return F.cross_entropy(logits.flatten(0, 1), answer_tokens.flatten())

    def _pointer_logits(self, rows, item_embeddings, item_mask, n_candidates):
        """Label logits (B, m) of ``answer_head: pointer``: label j's output row is candidate slot j's
        final state (times W, identity at init), not a fixed LM-head row: the answer needs no attention
        hop to the right slot and no copy of its label, the circuit an untrained backbone does not find
        on a CPU budget (docs/models/Speeder.md). Scaled by 1/sqrt(hidden size) as attention scores."""
        input_ids, inputs_embeds, attention_mask = self._inputs(rows, item_embeddings, item_mask)
        states = self.llm.hidden_states(inputs_embeds, attention_mask)
        batch = torch.arange(len(rows), device=states.device)
        answer = self.pointer(states[batch, attention_mask.sum(dim=1) - 1])
        placeholders = input_ids == self.prompt.placeholder
        from_the_end = placeholders.flip(1).cumsum(dim=1).flip(1)  # the candidates are the last m slots
        slot_positions = torch.stack(
            [(placeholders & (from_the_end == n_candidates - j)).int().argmax(dim=1) for j in range(n_candidates)], dim=1)
        slots = states[batch.unsqueeze(1), slot_positions]
        return (slots * answer.unsqueeze(1)).sum(dim=-1).float() / states.shape[-1] ** 0.5

    # ------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction):
        histories, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        targets = interaction[self.POS_ITEM_ID]
        candidates, slots = self.candidate_sampler.training_candidates(histories, targets)
        rows, items, mask = self._assemble(histories, lengths, candidates, "recommend")
        if self.answer_head == "pointer":
            loss = F.cross_entropy(self._pointer_logits(rows, items, mask, candidates.shape[1]), slots)
        else:
            label_ids = torch.tensor(self.prompt.label_ids, device=slots.device)[slots]
            loss = self._answer_loss(rows, items, mask, label_ids)
        if self.ppt_rate > 0:
            chosen = torch.from_numpy(self.ppt_rng.random(len(targets)) < self.ppt_rate).to(histories.device)
            ppt_rows, triples, labels = position_proxy_batch(histories[chosen], self.ppt_rng)
            if len(ppt_rows):
                picked = torch.nonzero(chosen).squeeze(1)[ppt_rows]
                p_rows, p_items, p_mask = self._assemble(histories[picked], lengths[picked], triples, "ppt")
                answers = torch.tensor(self.prompt.ppt_answer_ids, device=labels.device)[labels.long()]
                ppt_loss = self._answer_loss(p_rows, p_items, p_mask, answers)
                loss = (loss * len(targets) + ppt_loss * len(ppt_rows)) / (len(targets) + len(ppt_rows))
        return loss

    def evaluation_candidates(self, interaction):
        return self.evaluation_source.evaluation_candidates(
            interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.POS_ITEM_ID]
        )

    def candidate_scores(self, interaction, candidates):
        """Constrained scoring: next-token logits of the m candidate labels after the prompt, (B, m)
        (the pointer head's label logits with ``answer_head: pointer``)."""
        histories, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        rows, items, mask = self._assemble(histories, lengths, candidates, "recommend")
        if self.answer_head == "pointer":
            return self._pointer_logits(rows, items, mask, candidates.shape[1])
        _, inputs_embeds, attention_mask = self._inputs(rows, items, mask)
        logits = self.llm.next_token_logits(inputs_embeds, attention_mask)
        label_ids = torch.tensor(self.prompt.label_ids[: candidates.shape[1]], device=logits.device)
        return logits[:, label_ids].float()

    def generate_answers(self, interaction, candidates):
        """Free greedy decoding (``max_new_tokens``, stops at </s>) and parsing: (B,) slots, -1 = invalid.

        Returns the slots and the generated ids (B, max_new_tokens; </s>-padded)."""
        histories, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        rows, items, mask = self._assemble(histories, lengths, candidates, "recommend")
        _, inputs_embeds, attention_mask = self._inputs(rows, items, mask)
        ends = attention_mask.sum(dim=1)
        batch = torch.arange(len(rows), device=ends.device)
        generated = torch.full((len(rows), self.max_new_tokens), self.prompt.eos, dtype=torch.long, device=ends.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=ends.device)
        for step in range(self.max_new_tokens):
            next_ids = self.llm.next_token_logits(inputs_embeds, attention_mask).argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.prompt.eos), next_ids)
            generated[:, step] = next_ids
            finished |= next_ids == self.prompt.eos
            if bool(finished.all()):
                break
            # right padding: the new token goes into the first free column of each row
            inputs_embeds = torch.cat([inputs_embeds, torch.zeros_like(inputs_embeds[:, :1])], dim=1)
            attention_mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, :1])], dim=1)
            inputs_embeds[batch, ends] = self.llm.embed_tokens(next_ids).to(inputs_embeds.dtype)
            attention_mask[batch, ends] = 1
            ends = ends + 1
        slots = [self.prompt.parse_answer(row, candidates.shape[1]) for row in generated.tolist()]
        return torch.tensor(slots, device=ends.device), generated

    def full_sort_predict(self, interaction):
        """(B, n_items) scores finite only on the sample's fixed candidate set (all -inf = invalid answer)."""
        candidates, _ = self.evaluation_candidates(interaction)
        if self.inference == "constrained":
            candidate_scores = self.candidate_scores(interaction, candidates)
        else:
            slots, _ = self.generate_answers(interaction, candidates)
            candidate_scores = torch.full(candidates.shape, float("-inf"), device=candidates.device)
            valid = slots >= 0
            candidate_scores[valid, slots[valid]] = 0.0
        scores = torch.full((len(candidates), self.n_items), float("-inf"), device=candidates.device)
        return scores.scatter(1, candidates, candidate_scores)

    def predict(self, interaction):
        raise RecboleMMError(
            "Speeder answers with one of its candidate sets (eval_args.mode: full) and cannot score arbitrary "
            "(user, item) pairs; use full-sort evaluation with metrics [HR, ValidRatio, VHR]."
        )


# ---------------------------------------------------------------------------------------------
# Sequential (ID) features: a RecBole SASRec trained on the same training split
# ---------------------------------------------------------------------------------------------
SASREC_KEYS = ("hidden_size", "inner_size", "n_layers", "n_heads", "epochs", "learning_rate", "train_batch_size")


def sasrec_item_table(config, dataset):
    """Item embedding table (n_items, d) of a RecBole SASRec trained on ``dataset`` (the training
    split the model is built with), for a fixed number of epochs (no early stopping on validation).

    Hyperparameters come from ``id_sasrec: {hidden_size, inner_size, n_layers, n_heads, epochs,
    learning_rate, train_batch_size}``. The table is cached under ``checkpoint_dir`` keyed by those
    values, the dataset, its item count and the seed, so the three MPO stages and later runs reuse it.
    """
    from recbole.data.dataloader import TrainDataLoader
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    settings = {key: config["id_sasrec"][key] for key in SASREC_KEYS}
    key = json.dumps([config["dataset"], str(config["data_path"]), dataset.item_num, config["seed"], settings], sort_keys=True)
    cache = os.path.join(config["checkpoint_dir"], f"Speeder-SASRec-items-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    if os.path.isfile(cache):
        return torch.load(cache, weights_only=True)

    sas_config = copy.deepcopy(config)
    sas_config.final_config_dict.update(
        model="SASRec", loss_type="CE", hidden_dropout_prob=0.5, attn_dropout_prob=0.5,
        hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02, metrics=["Recall"], topk=[10],
        valid_metric="Recall@10", clip_grad_norm=None, show_progress=False, **settings,
    )
    train_data = TrainDataLoader(sas_config, dataset, None, shuffle=True)
    model = SASRec(sas_config, dataset).to(sas_config["device"])
    Trainer(sas_config, model).fit(train_data, valid_data=None, saved=False, verbose=False)
    table = model.item_embedding.weight.detach().cpu().clone()
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    torch_save_atomic(table, cache)
    return table
