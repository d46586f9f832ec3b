import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_mm.tools.embedding_analysis import (
    behaviour_target_distances,
    kendall_tau,
    load_item_matrix,
    singular_value_spectrum,
    write_spectrum,
)
from recbole_mm.model.mmesid import normalised_log_frequency, sample_negatives
from recbole_mm.quick_start import build
from recbole_mm.utils import RecboleMMError
from tests.conftest import scientific_slice_config, write_scientific_slice

HIDDEN, LEVELS, CODES, N_ROWS = 16, 2, 4, 1585
TINY_LLM = {"llm_hidden_size": HIDDEN, "llm_num_layers": 1, "llm_num_heads": 2, "fusion_hidden_size": 8}


@pytest.fixture(scope="module")
def slice_root(scientific_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmesid")
    cwd = os.getcwd()
    os.chdir(root)  # saved/ and log/ land here
    write_scientific_slice(scientific_dir, root / "data", n_users=60)
    yield root
    os.chdir(cwd)


@pytest.fixture(scope="module")
def stage_files(slice_root):
    """Synthetic stage-1/2 outputs over every Scientific item token (row r = token str(r))."""
    generator = torch.Generator().manual_seed(0)
    tokens = [str(row) for row in range(N_ROWS)]
    collab = slice_root / "collab.pt"
    torch.save({"item_tokens": tokens, "embedding": torch.randn(N_ROWS, 8, generator=generator)}, collab)
    sid = slice_root / "sid.pt"
    channels = ["collab", "text", "image"]
    torch.save({
        "item_tokens": tokens,
        "codes": {m: torch.randint(0, CODES, (N_ROWS, LEVELS), generator=generator) for m in channels},
        "codebooks": {m: torch.randn(LEVELS, CODES, HIDDEN, generator=generator) for m in channels},
    }, sid)
    return {"mmesid_collab_file": str(collab), "mmesid_sid_file": str(sid)}


def build_mmesid(slice_root, stage_files, **overrides):
    config = scientific_slice_config(slice_root / "data", **{**TINY_LLM, **stage_files, **overrides})
    return build("MMESID", "SciSlice", config_dict=config)


@pytest.fixture(scope="module")
def built(slice_root, stage_files):
    return build_mmesid(slice_root, stage_files, llm_tuning="lora", lora_rank=2)


def first_batch(train):
    return next(iter(train))


def test_sid_tables_start_from_the_codebooks(built, stage_files):
    _, (train, _, _), model, _ = built
    saved = torch.load(stage_files["mmesid_sid_file"], weights_only=True)
    tokens = train.dataset.field2id_token[train.dataset.iid_field]
    for name in model.channels:
        assert torch.equal(model.sid_tables[name].detach(), saved["codebooks"][name])
        for item in (1, 7, len(tokens) - 1):
            codes = saved["codes"][name][int(tokens[item])]
            expected = sum(saved["codebooks"][name][level, codes[level]] for level in range(LEVELS))
            torch.testing.assert_close(model.semantic_id_embeddings(name, torch.tensor(item)), expected)


def test_collab_table_from_tokens_dict_and_from_npy_rows(built, slice_root, stage_files):
    _, (train, _, _), model, _ = built
    tokens = train.dataset.field2id_token[train.dataset.iid_field]
    saved = torch.load(stage_files["mmesid_collab_file"], weights_only=True)["embedding"]
    for item in (1, 4, len(tokens) - 1):
        assert torch.equal(model.feature_table("collab")[item], saved[int(tokens[item])])
    assert not model.feature_mask("collab")[0] and model.feature_mask("collab")[1:].all()
    rows = np.random.default_rng(1).standard_normal((N_ROWS, 5)).astype(np.float32)
    np.save(slice_root / "collab_rows.npy", rows)
    _, _, from_npy, _ = build_mmesid(slice_root, {**stage_files, "mmesid_collab_file": str(slice_root / "collab_rows.npy")})
    for item in (1, 4, len(tokens) - 1):
        np.testing.assert_array_equal(from_npy.feature_table("collab")[item].numpy(), rows[int(tokens[item])])


def test_random_sid_init_is_not_the_codebooks(slice_root, stage_files):
    _, _, model, _ = build_mmesid(slice_root, stage_files, sid_init="random")
    saved = torch.load(stage_files["mmesid_sid_file"], weights_only=True)
    assert not torch.allclose(model.sid_tables["text"].detach(), saved["codebooks"]["text"])


def test_codebook_width_must_match_llm(slice_root, stage_files):
    with pytest.raises(RecboleMMError, match="rqvae_latent_dim"):
        build_mmesid(slice_root, stage_files, llm_hidden_size=32)


def test_missing_stage_file_is_a_clear_error(slice_root, stage_files):
    with pytest.raises(RecboleMMError, match="mmesid_sid_file"):
        build_mmesid(slice_root, {**stage_files, "mmesid_sid_file": str(slice_root / "nope.pt")})


def test_fusion_weights_sum_to_one(built):
    _, _, model, _ = built
    weights = model.fusion_weights()
    # the padding item 0 has no feature row in any modality: all its weight is on E_x
    assert weights.shape == (model.n_items, 4) and (weights[1:] > 0).all()
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(model.n_items))
    model.use_fusion = False
    try:
        torch.testing.assert_close(model.fusion_weights()[1:], torch.full((model.n_items - 1, 4), 0.25))
    finally:
        model.use_fusion = True


def test_authors_fusion_mlp_has_their_layers(built):
    _, _, model, _ = built
    g = model.fusion_mlp
    # model.py: Linear(1,64) GELU Linear(64,10) | Linear(10,64, bias=False) GELU Linear(64,4)  (64 -> fusion_hidden_size)
    shapes = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
               getattr(m, "bias", None) is not None) for m in g]
    assert shapes == [("Linear", 1, 8, True), ("GELU", None, None, False), ("Linear", 8, 10, True),
                      ("Linear", 10, 8, False), ("GELU", None, None, False), ("Linear", 8, 4, True)]
    q = model.item_frequency_feature[1:6]
    gelu = torch.nn.functional.gelu
    hidden = gelu(q @ g[0].weight.t() + g[0].bias) @ g[2].weight.t() + g[2].bias
    expected = gelu(hidden @ g[3].weight.t()) @ g[5].weight.t() + g[5].bias
    torch.testing.assert_close(g(q), expected)
    torch.testing.assert_close(model.fusion_weights(torch.arange(1, 6)), torch.softmax(expected / model.fusion_temperature, -1))


def test_one_hidden_fusion_mlp(slice_root, stage_files):
    _, _, model, _ = build_mmesid(slice_root, stage_files, fusion_mlp="one_hidden")
    g = model.fusion_mlp
    assert [type(m).__name__ for m in g] == ["Linear", "GELU", "Linear"]
    assert (g[0].in_features, g[0].out_features, g[2].in_features, g[2].out_features) == (1, 8, 8, 4)


INSTRUCTION_WORDS = ["given", "the", "user", "'", "s", "purchase", "history", ",", "predict", "next", "possible",
                     "item", "to", "be", "purchased", "."]
ASSISTANT_HEADER = ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>"]


@pytest.mark.parametrize("template, before, after", [
    # utils/prompter.py: "<|begin_of_text|>{{ Given ..." after str.format, then response_split
    ("authors_code", ["<|begin_of_text|>", "{"] + INSTRUCTION_WORDS, ASSISTANT_HEADER),
    # README / dataset/llama3.json
    ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "you", "are", "a", "helpful",
                "ai", "assistant", "for", "recommendations", "<|eot_id|>", "<|start_header_id|>", "user",
                "<|end_header_id|>"] + INSTRUCTION_WORDS, ASSISTANT_HEADER),
    ("plain", INSTRUCTION_WORDS, ["answer", ":"]),
])
def test_prompt_templates(slice_root, stage_files, template, before, after):
    _, _, model, _ = build_mmesid(slice_root, stage_files, prompt_template=template)
    tokens = model.llm.tokenizer.convert_ids_to_tokens
    assert tokens(model.prompt_prefix) == before
    assert tokens(model.prompt_suffix) == after


def test_unknown_prompt_template_is_a_clear_error(slice_root, stage_files):
    with pytest.raises(RecboleMMError, match="prompt_template"):
        build_mmesid(slice_root, stage_files, prompt_template="chatml")


def test_frequency_feature_is_minmax_log_count(built):
    _, (train, _, _), model, _ = built
    targets = train.dataset.inter_feat["item_id"].tolist()
    logs = [math.log(targets.count(item) + 1) for item in range(model.n_items)]
    expected = [(v - min(logs)) / (max(logs) - min(logs)) for v in logs]
    torch.testing.assert_close(normalised_log_frequency(train.dataset, model.n_items).squeeze(-1),
                               torch.tensor(expected, dtype=torch.float32))


def test_item_vector_follows_eq16(built):
    _, _, model, _ = built
    items = torch.tensor([1, 5, 9])
    parts = []
    for name in ["collab", "text", "image"]:
        present = model.feature_mask(name)[items].float()[:, None]
        projected = model.feature_table(name)[items] @ model.projections[name].weight.t() + model.projections[name].bias
        sid_sum = sum(model.sid_tables[name][level][getattr(model, f"sid_{name}")[items, level]] for level in range(LEVELS))
        parts += [projected * present, sid_sum * present]
    mlp = model.item_mlp
    expected = torch.nn.functional.gelu(mlp[2](torch.relu(mlp[0](torch.cat(parts, -1)))))
    torch.testing.assert_close(model.item_input_embeddings(items), expected)


def test_scores_follow_eq18_and_full_equals_per_item(built):
    _, (train, _, _), model, _ = built
    model.eval()
    batch = first_batch(train)
    with torch.no_grad():
        state = model.forward(batch["item_id_list"], batch["item_length"])
        full = model.full_scores(state)
        items = torch.randint(1, model.n_items, (len(state), 6))
        torch.testing.assert_close(model.item_scores(state, items), full.gather(1, items), rtol=1e-5, atol=1e-5)
        # eq. 18 written out for one user and one item
        user, item = 0, int(items[0, 0])
        w = model.fusion_weights()[item]
        expected = w[0] * state[user] @ model.target_item_embedding.weight[item]
        for k, name in enumerate(model.channels, start=1):
            expected += w[k] * state[user] @ model.projections[name](model.feature_table(name)[item])
        torch.testing.assert_close(full[user, item], expected, rtol=1e-5, atol=1e-5)
    model.train()


def test_negatives_never_hit_the_positive():
    positives = torch.tensor([1, 2, 5, 9] * 50)
    negatives = sample_negatives(positives, n_items=10, n_negatives=7)
    assert negatives.min() >= 1 and negatives.max() <= 9
    assert not (negatives == positives[:, None]).any()
    assert set(negatives[positives == 5].flatten().tolist()) == {1, 2, 3, 4, 6, 7, 8, 9}


@pytest.mark.parametrize("loss_type", ["CE", "BCE"])
def test_gradients_reach_exactly_the_trainable_parameters(slice_root, stage_files, loss_type):
    _, (train, _, _), model, _ = build_mmesid(slice_root, stage_files, llm_tuning="lora", lora_rank=2,
                                              loss_type=loss_type, bce_negatives=3)
    trainable_prefixes = ("projections.", "sid_tables.", "item_mlp.", "target_item_embedding.", "fusion_mlp.")
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        expected = name.startswith(trainable_prefixes) or "lora_" in name
        assert parameter.requires_grad == expected, name
    model.calculate_loss(first_batch(train)).backward()
    for name, parameter in named.items():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            if "lora_A" not in name:  # lora_B starts at zero, so A's first gradient is zero
                assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    # the frozen inputs are buffers, never parameters
    assert not any(name.startswith("item_feature") for name in named)


def test_full_tuning_trains_the_backbone(slice_root, stage_files):
    _, (train, _, _), model, _ = build_mmesid(slice_root, stage_files, llm_tuning="full")
    assert all(p.requires_grad for p in model.parameters())
    model.calculate_loss(first_batch(train)).backward()
    assert model.llm.embed_tokens(torch.tensor([0])).shape[-1] == HIDDEN
    layer_weight = dict(model.llm.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert layer_weight.grad is not None and layer_weight.grad.abs().sum() > 0


def test_trains_a_step_on_a_pretrained_local_checkpoint(slice_root, stage_files):
    """llm_path: the offline all-MiniLM-L6-v2 folder (a real BERT checkpoint) as MMESID's backbone: its
    WordPiece tokenizer encodes the prompt, LoRA on its attention trains, its own weights stay as stored,
    and scoring covers every item."""
    from safetensors.torch import load_file

    from tests.test_llm import minilm_path

    generator = torch.Generator().manual_seed(1)
    semantic_ids = torch.load(stage_files["mmesid_sid_file"], weights_only=True)
    # sid_init: codebook needs codebooks as wide as the backbone (MiniLM: 384)
    semantic_ids["codebooks"] = {name: torch.randn(LEVELS, CODES, 384, generator=generator)
                                 for name in semantic_ids["codebooks"]}
    wide_sid_file = slice_root / "sid-384.pt"
    torch.save(semantic_ids, wide_sid_file)
    _, (train, valid, _), model, _ = build_mmesid(
        slice_root, {**stage_files, "mmesid_sid_file": str(wide_sid_file)}, llm_path=minilm_path(),
        lora_target_modules=["query", "value"], lora_rank=2)
    assert model.llm.hidden_size == 384
    tokenizer = model.llm.tokenizer
    words = tokenizer.convert_ids_to_tokens(list(model.prompt_prefix))
    assert {"given", "user", "purchase", "history"} <= set(words)  # MiniLM's WordPiece vocabulary
    stored = load_file(str(Path(minilm_path()) / "model.safetensors"))
    query_weight = next(p for n, p in model.llm.named_parameters() if n.endswith("layer.0.attention.self.query.base_layer.weight"))
    assert not query_weight.requires_grad
    torch.testing.assert_close(query_weight.detach(), stored["encoder.layer.0.attention.self.query.weight"])

    model.calculate_loss(first_batch(train)).backward()
    lora_b = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 6  # query and value in each of MiniLM's six layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    model.eval()
    batch = next(iter(valid))
    interaction = batch[0] if isinstance(batch, tuple) else batch
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()


# ---- analysis tools ------------------------------------------------------------------------
def naive_kendall_tau(x, y):
    concordant = discordant = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / (n * (n - 1) / 2)


def test_kendall_tau_equals_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 60).astype(float)  # many ties
    y = x + rng.normal(0, 2, 60)
    y[:10] = 1.0
    assert abs(kendall_tau(x, y) - naive_kendall_tau(x, y)) < 1e-12
    z = rng.normal(size=40)
    assert abs(kendall_tau(z, -z) + 1) < 1e-12


def test_behaviour_target_distances_match_loop():
    embedding = torch.randn(10, 3)
    item_seq = torch.tensor([[1, 2, 0], [3, 4, 5]])
    lengths, targets = torch.tensor([2, 3]), torch.tensor([6, 7])
    expected = [torch.dist(embedding[item_seq[b, k]], embedding[targets[b]]).item()
                for b in range(2) for k in range(int(lengths[b]))]
    np.testing.assert_allclose(behaviour_target_distances(embedding, item_seq, lengths, targets), expected, rtol=1e-6)


def test_spectrum_matches_numpy_and_writes_files(tmp_path):
    matrix = torch.randn(30, 5, dtype=torch.float64) @ torch.randn(5, 8, dtype=torch.float64)  # rank 5
    values, normalised = singular_value_spectrum(matrix)
    np.testing.assert_allclose(values.numpy(), np.linalg.svd(matrix.numpy(), compute_uv=False), rtol=1e-8, atol=1e-12)
    assert normalised[0] == 1 and normalised[5:].max() < 1e-12
    torch.save({"item_tokens": ["a"], "nested": {"m": matrix}}, tmp_path / "m.pt")
    csv_path, png_path = write_spectrum({"m": load_item_matrix(f"{tmp_path / 'm.pt'}:nested.m")}, tmp_path / "spec")
    assert png_path.stat().st_size > 0 and len(csv_path.read_text().splitlines()) == 1 + 8


# ---- all stages end to end -------------------------------------------------------------------
def test_all_stages_end_to_end_on_a_slice(slice_root):
    from recbole_mm.quick_start.mmesid import export_item_tables, prepare_run
    from recbole_mm.quick_start import run

    config = scientific_slice_config(
        slice_root / "data", **TINY_LLM, train_batch_size=64,
        rqvae_hidden_dims=[32], rqvae_levels=2, rqvae_codebook_size=8, rqvae_epochs=2, rqvae_batch_size=512,
        rqvae_sinkhorn_epsilons=[0.0, 0.003],
        collab_config={"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "epochs": 1,
                       "loss_type": "CE", "train_neg_sample_args": None},
        mmesid_cache_dir=str(slice_root / "cache"), checkpoint_dir=str(slice_root / "saved"),
    )
    # one command: SASRec item table -> MM-RQ-VAE -> LLM fine-tuning and full-ranking test
    result = run("MMESID", "SciSlice", config_dict=config, cmd_args=["--rqvae_epochs=3"])
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}

    cache = sorted(path.name for path in (slice_root / "cache" / "SciSlice").iterdir())
    assert [name.split("-")[0] for name in cache] == ["collab", "sid"]
    mtimes = {path: path.stat().st_mtime for path in (slice_root / "cache" / "SciSlice").iterdir()}
    prepared = prepare_run("SciSlice", config_dict=config, cmd_args=["--rqvae_epochs=3"])  # cached: no recompute
    assert all(path.stat().st_mtime == mtime for path, mtime in mtimes.items())
    assert len(list((slice_root / "cache" / "SciSlice").iterdir())) == 2

    sid = torch.load(prepared["mmesid_sid_file"], weights_only=True)
    assert sid["codebooks"]["text"].shape == (2, 8, HIDDEN) and len(sid["history"]) == 3
    assert sid["stats"]["joint"]["items"] > 0 and 0 <= sid["stats"]["text"]["collision_rate"] <= 1
    assert torch.load(prepared["mmesid_collab_file"], weights_only=True)["embedding"].shape[1] == 8
    tables = torch.load(export_item_tables("SciSlice", result["checkpoint"], config_dict=prepared), weights_only=True)
    assert tables["input_table"].shape[1] == HIDDEN and set(tables["quantized"]) == {"collab", "text", "image"}

    # a tokenizer setting changes only the tokenizer file
    changed = prepare_run("SciSlice", config_dict={**config, "rqvae_recon_loss": "mse"}, stop_after="tokenizer")
    assert changed["mmesid_collab_file"] == prepared["mmesid_collab_file"]
    assert changed["mmesid_sid_file"] != prepared["mmesid_sid_file"]
