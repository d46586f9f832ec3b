"""Hugging Face causal-LM backbone shared by the LLM recommenders (MMESID, Speeder).

What it does:
- loads any local causal-LM checkpoint (``llm_path``), optionally 4-bit (NF4) when bitsandbytes
  and CUDA are present; a bare encoder checkpoint (BERT, MiniLM) runs as a causal decoder under the
  LM head transformers pairs with it;
- without a checkpoint, builds a small *untrained* Llama-architecture model from config with a
  word-level tokenizer built offline over the prompt vocabulary (nothing is downloaded);
- tunes it with LoRA (peft) or fully (``llm_tuning: lora | full | frozen``);
- splices item vectors into the token embeddings at placeholder positions, and reads out the hidden
  state / next-token logits at the last real (non-padding) position.

Config keys (all optional; see ``backbone_from_config``):
``llm_path``, ``llm_tokenizer_path``, ``llm_load_in_4bit``, ``llm_hidden_size``, ``llm_num_layers``,
``llm_num_heads``, ``llm_intermediate_size``, ``llm_max_positions``, ``llm_tie_embeddings``, ``llm_tuning``, ``lora_rank``,
``lora_alpha``, ``lora_dropout``, ``lora_target_modules``.
"""

import importlib.util
import logging
import os
import re
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
ITEM_PLACEHOLDER = "[item]"
LLM_TUNING_MODES = ("lora", "full", "frozen")
LLAMA_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

logger = logging.getLogger(__name__)


def _config_value(config, key, default):
    """Read ``key`` from a RecBole ``Config`` or a plain dict; ``None``/absent means ``default``."""
    value = config[key] if key in config else None
    return default if value is None else value


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def build_word_level_tokenizer(texts: Iterable[str], extra_special_tokens: Sequence[str] = ()):
    """An offline word-level tokenizer over the words of ``texts`` (lower-cased).

    Words are split like ``\\w+|[^\\w\\s]+``; unknown words map to ``<unk>``. ``<pad>``, ``<unk>``,
    ``<s>``, ``</s>``, ``[item]`` and ``extra_special_tokens`` are never split (e.g. ``[item]`` or
    answer-index tokens). The vocabulary is sorted, so the same texts always give the same ids.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, ITEM_PLACEHOLDER]
    special += [t for t in extra_special_tokens if t not in special]
    words = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    vocab = {token: index for index, token in enumerate(special)}
    for word in sorted(words - set(vocab)):
        vocab[word] = len(vocab)

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def ensure_tokens(tokenizer, model, tokens: Sequence[str]):
    """Add ``tokens`` (e.g. ``[item]``) to a pretrained tokenizer as special tokens and grow the
    model's embedding table to match. Returns the number of tokens added."""
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not missing:
        return 0
    added = tokenizer.add_tokens(missing, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    return added


# --------------------------------------------------------------------------------------------
# Backbone construction
# --------------------------------------------------------------------------------------------
def build_small_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: Optional[int] = None,
    max_positions: int = 512,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    tie_embeddings: bool = False,
):
    """A randomly initialised Llama-architecture causal LM (the CPU default: untrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(
            f"llm_hidden_size={hidden_size} must be divisible by llm_num_heads={num_heads}: change one of them."
        )
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    return LlamaForCausalLM(llama_config)


def is_encoder_only(config) -> bool:
    """A checkpoint saved as a bare encoder (architectures like ``BertModel``), not as a language model.

    Decoder-only config classes (Llama, GPT-2, ...) have no ``is_decoder`` in transformers 5: they are
    causal whatever their saved architecture (a bare ``LlamaModel`` too)."""
    architectures = config.architectures or []
    language_model = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    decoder = getattr(config, "is_decoder", True)
    return bool(architectures) and not language_model and not decoder and not config.is_encoder_decoder


def four_bit_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def load_pretrained_causal_lm(llm_path: str, load_in_4bit: bool = False, tokenizer_path: Optional[str] = None):
    """Load a local Hugging Face causal LM and its tokenizer (no hub access: ``local_files_only``).

    ``load_in_4bit`` uses bitsandbytes NF4 (as the MME-SID authors do) when bitsandbytes and CUDA
    exist; otherwise it warns and loads the full-precision weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(llm_path):
        raise FileNotFoundError(
            f"llm_path={llm_path!r} is not a directory: point llm_path at a local Hugging Face checkpoint "
            "(config.json + weights + tokenizer files), or leave it empty for the small built-in Llama."
        )
    kwargs = {"local_files_only": True}
    if load_in_4bit:
        if four_bit_available():
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        else:
            logger.warning("llm_load_in_4bit=True needs bitsandbytes and CUDA; loading full-precision weights.")
    config = AutoConfig.from_pretrained(llm_path, local_files_only=True)
    if is_encoder_only(config):
        # e.g. a BERT / MiniLM sentence encoder: run its layers with a causal mask (is_decoder) under
        # the LM head transformers pairs with it (tied to the word embeddings; its transform is new)
        logger.warning(f"llm_path={llm_path!r} is an encoder ({', '.join(config.architectures or [config.model_type])}):"
                       " using it as a causal decoder; its LM-head transform starts untrained.")
        config.is_decoder = True
    model = AutoModelForCausalLM.from_pretrained(llm_path, config=config, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or llm_path, local_files_only=True)
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token  # BERT-style tokenizers end a sequence with [SEP]
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.pad_token is None:
        # Llama tokenizers ship without a pad token; padding is always masked, so eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if load_in_4bit and four_bit_available():
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def apply_tuning(
    model,
    tuning: str = "lora",
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = LLAMA_MLP_MODULES,
):
    """``lora``: freeze the base weights and add peft LoRA adapters on ``target_modules``;
    ``full``: every weight trains; ``frozen``: nothing in the backbone trains."""
    if tuning not in LLM_TUNING_MODES:
        raise ValueError(f"llm_tuning={tuning!r}: choose one of {', '.join(LLM_TUNING_MODES)}.")
    if tuning == "lora":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora_config)
    for parameter in model.parameters():
        parameter.requires_grad_(tuning == "full")
    return model


# --------------------------------------------------------------------------------------------
# Prompt assembly and read-out
# --------------------------------------------------------------------------------------------
def splice_item_embeddings(token_embeddings, input_ids, placeholder_id: int, item_embeddings, item_mask=None):
    """Replace the embedding at every ``placeholder_id`` position by the next item vector.

    token_embeddings (B, T, H); input_ids (B, T); item_embeddings (B, N, H); item_mask (B, N) bool
    marks the real items (default: all). Row b's placeholders, left to right, receive row b's real
    items in order; their counts must match. Gradients flow to both inputs.
    """
    positions = input_ids == placeholder_id
    if item_mask is None:
        item_mask = torch.ones(item_embeddings.shape[:2], dtype=torch.bool, device=item_embeddings.device)
    placeholders_per_row = positions.sum(dim=1)
    items_per_row = item_mask.sum(dim=1)
    if not torch.equal(placeholders_per_row, items_per_row.to(placeholders_per_row.device)):
        raise ValueError(
            f"each prompt needs one placeholder per item: placeholders per row {placeholders_per_row.tolist()} "
            f"vs items per row {items_per_row.tolist()}."
        )
    spliced = token_embeddings.clone()
    # Boolean indexing enumerates positions row-major on both sides, which pairs them up in order.
    spliced[positions] = item_embeddings[item_mask].to(spliced.dtype)
    return spliced


def build_prompt_ids(prefix_ids, n_items, suffix_ids, placeholder_id: int, pad_id: int, device=None):
    """``prefix + [placeholder] * n_items[b] + suffix`` per row, right-padded.

    Returns ``input_ids`` (B, T) and ``attention_mask`` (B, T) (1 = real token).
    """
    n_items = torch.as_tensor(n_items).tolist()
    rows = [list(prefix_ids) + [placeholder_id] * n + list(suffix_ids) for n in n_items]
    return pad_rows(rows, pad_id, device)


def pad_rows(rows, pad_id, device=None):
    """Right-pad token-id lists -> ``input_ids`` (B, T) and ``attention_mask`` (B, T) (1 = real token)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


def last_real_positions(attention_mask):
    """Index of the last 1 in each row of ``attention_mask`` (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def position_ids_from_mask(attention_mask):
    """Positions counted over real tokens only, so left padding does not shift the rotary phase."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LLMBackbone(nn.Module):
    """A causal LM + tokenizer with the operations the LLM recommenders need."""

    def __init__(self, model, tokenizer, tuning: str = "frozen", **lora_kwargs):
        super().__init__()
        self.tokenizer = tokenizer
        self.tuning = tuning
        self.model = apply_tuning(model, tuning, **lora_kwargs)
        self.placeholder_id = tokenizer.convert_tokens_to_ids(ITEM_PLACEHOLDER)

    # ---- model parts (peft wraps the model; these see through it) ----
    def _causal_lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def hidden_size(self) -> int:
        return self._causal_lm().config.hidden_size

    @property
    def decoder(self):
        return self._causal_lm().get_decoder()

    @property
    def lm_head(self):
        return self._causal_lm().get_output_embeddings()

    def embed_tokens(self, input_ids):
        return self._causal_lm().get_input_embeddings()(input_ids)

    def encode(self, text: str, add_special_tokens: bool = False):
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # ---- forward ----
    def build_inputs_embeds(self, input_ids, item_embeddings, item_mask=None):
        """Token embeddings of ``input_ids`` with item vectors spliced in at ``[item]`` positions."""
        embeddings = self.embed_tokens(input_ids)
        return splice_item_embeddings(embeddings, input_ids, self.placeholder_id, item_embeddings, item_mask)

    def hidden_states(self, inputs_embeds, attention_mask):
        """Final-layer hidden states (B, T, H), final norm applied."""
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return outputs.last_hidden_state

    def last_hidden_state(self, inputs_embeds, attention_mask):
        """Hidden state (B, H) at each row's last real position: the user state."""
        states = self.hidden_states(inputs_embeds, attention_mask)
        rows = torch.arange(states.shape[0], device=states.device)
        return states[rows, last_real_positions(attention_mask)]

    def next_token_logits(self, inputs_embeds, attention_mask):
        """Next-token logits (B, V) after each row's last real position (only that position goes
        through the LM head, which matters for 128k-token vocabularies)."""
        last = self.last_hidden_state(inputs_embeds, attention_mask)
        return self.lm_head(last.to(self.lm_head.weight.dtype))

    def trainable_parameter_count(self):
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


def backbone_hidden_size(config) -> int:
    """Hidden size the backbone of ``backbone_from_config`` will have, without building it (reads
    ``config.json`` of ``llm_path``), e.g. to size item vectors before the LLM stage."""
    llm_path = _config_value(config, "llm_path", "")
    if llm_path:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(llm_path, local_files_only=True).hidden_size)
    return int(_config_value(config, "llm_hidden_size", 64))


def backbone_from_config(config, vocab_texts: Iterable[str] = (), extra_special_tokens: Sequence[str] = ()):
    """Build the backbone from RecBole-style config.

    With ``llm_path``: that local checkpoint (its tokenizer, grown by ``[item]`` and
    ``extra_special_tokens``). Without: a small untrained Llama (``llm_hidden_size``,
    ``llm_num_layers``, ``llm_num_heads``, ``llm_intermediate_size``, ``llm_max_positions``) with a
    word-level tokenizer over ``vocab_texts`` (or ``llm_tokenizer_path`` if given).
    """
    llm_path = _config_value(config, "llm_path", "")
    tokenizer_path = _config_value(config, "llm_tokenizer_path", "") or None
    if llm_path:
        model, tokenizer = load_pretrained_causal_lm(
            llm_path, bool(_config_value(config, "llm_load_in_4bit", False)), tokenizer_path
        )
        ensure_tokens(tokenizer, model, [ITEM_PLACEHOLDER, *extra_special_tokens])
    else:
        if tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            tokenizer.add_tokens([ITEM_PLACEHOLDER, *extra_special_tokens], special_tokens=True)
        else:
            tokenizer = build_word_level_tokenizer(vocab_texts, extra_special_tokens)
        model = build_small_llama(
            vocab_size=len(tokenizer),
            hidden_size=int(_config_value(config, "llm_hidden_size", 64)),
            num_layers=int(_config_value(config, "llm_num_layers", 2)),
            num_heads=int(_config_value(config, "llm_num_heads", 4)),
            intermediate_size=_config_value(config, "llm_intermediate_size", None),
            max_positions=int(_config_value(config, "llm_max_positions", 512)),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id,
            tie_embeddings=bool(_config_value(config, "llm_tie_embeddings", False)),
        )
    return LLMBackbone(
        model,
        tokenizer,
        tuning=_config_value(config, "llm_tuning", "lora" if llm_path else "full"),
        lora_rank=int(_config_value(config, "lora_rank", 8)),
        lora_alpha=int(_config_value(config, "lora_alpha", 16)),
        lora_dropout=float(_config_value(config, "lora_dropout", 0.05)),
        target_modules=list(_config_value(config, "lora_target_modules", LLAMA_MLP_MODULES)),
    )
