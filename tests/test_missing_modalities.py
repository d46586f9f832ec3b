"""Items that lack a modality: the feature hook's mask, FMRLRec's item table, MMESID's item vector
(eq. 16) and the MM-RQ-VAE losses (eq. 11), on a toy dataset where some items have no image.

The missing rows of the image file hold large finite garbage: the mask, not the file, must decide."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.layers.rqvae import MultimodalRQVAE
from recbole_mm.quick_start import build
from tests.conftest import write_timestamped_dataset

MISSING_IMAGE_ROWS = [0, 3, 7, 12, 21]  # rows of the image file whose item has no image
HIDDEN, LEVELS, CODES = 16, 2, 4


@pytest.fixture
def toy_without_some_images(in_tmp_cwd):
    root = in_tmp_cwd / "data"
    target, tokens, order, features = write_timestamped_dataset(root)
    n_rows, dim = features.shape
    image = np.random.default_rng(5).standard_normal((n_rows, dim + 2)).astype(np.float32)
    image[MISSING_IMAGE_ROWS] = 1e3  # what a converter leaves for an expired URL: anything, never read
    mask = np.ones(n_rows, dtype=bool)
    mask[MISSING_IMAGE_ROWS] = False
    np.save(target / "TimeToy.image.npy", image)
    np.save(target / "TimeToy.image.mask.npy", mask)
    row_of_token = {tokens[item]: row for row, item in enumerate(order)}
    return root, row_of_token, features, image, mask


def toy_config(root, **overrides):
    return {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "TIME_FIELD": "timestamp",
        "feature_tables": {
            "text": {"path": "TimeToy.text.npy"},
            "image": {"path": "TimeToy.image.npy", "mask": "TimeToy.image.mask.npy", "allow_missing": True},
        },
        "modalities": ["text", "image"],
        "MAX_ITEM_LIST_LENGTH": 10, "show_progress": False, "epochs": 1,
        "train_batch_size": 64, "eval_batch_size": 64,
        **overrides,
    }


def items_by_image(dataset, row_of_token, mask):
    """Internal ids of the items without and with an image, read from the file's mask."""
    tokens = dataset.field2id_token[dataset.iid_field]
    missing = [i for i in range(1, len(tokens)) if not mask[row_of_token[tokens[i]]]]
    present = [i for i in range(1, len(tokens)) if mask[row_of_token[tokens[i]]]]
    assert len(missing) == len(MISSING_IMAGE_ROWS) and present
    return missing, present


def test_fmrlrec_represents_an_item_without_image_by_its_text_and_the_bias(toy_without_some_images):
    root, row_of_token, text, image, mask = toy_without_some_images
    _, (train, _, _), model, _ = build("FMRLRec", "TimeToy", config_dict=toy_config(
        root, hidden_size=16, mrl_sizes=[8, 16]))
    dataset = train.dataset
    missing, present = items_by_image(dataset, row_of_token, mask)
    tokens = dataset.field2id_token[dataset.iid_field]
    assert not model.feature_mask("image")[missing].any() and model.feature_mask("image")[present].all()
    weight = model.feature_projection.weight.detach().double()  # (d, text_dim + image_dim), eq. 7
    bias = model.feature_projection.bias.detach().double()
    text_dim = text.shape[1]
    with torch.no_grad():
        table = model.item_table().double()
    for item in missing + present[:5]:
        row = row_of_token[tokens[item]]
        expected = weight[:, :text_dim] @ torch.from_numpy(text[row]).double() + bias
        if mask[row]:
            expected = expected + weight[:, text_dim:] @ torch.from_numpy(image[row]).double()
        torch.testing.assert_close(table[item], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def mmesid_stage_files(tmp_path):
    """Stage-1/2 outputs over every item token of the toy dataset, codebooks in the LLM width."""
    generator = torch.Generator().manual_seed(0)
    tokens = [f"I{index:04d}" for index in range(30)]
    collab, sid = tmp_path / "collab.pt", tmp_path / "sid.pt"
    torch.save({"item_tokens": tokens, "embedding": torch.randn(30, 6, generator=generator)}, collab)
    channels = ["collab", "text", "image"]
    torch.save({
        "item_tokens": tokens,
        "codes": {m: torch.randint(0, CODES, (30, LEVELS), generator=generator) for m in channels},
        "codebooks": {m: torch.randn(LEVELS, CODES, HIDDEN, generator=generator) for m in channels},
    }, sid)
    return {"mmesid_collab_file": str(collab), "mmesid_sid_file": str(sid)}


def test_mmesid_item_without_image_has_zeros_in_both_image_slots(toy_without_some_images, mmesid_stage_files):
    root, row_of_token, text, image, mask = toy_without_some_images
    config = toy_config(root, llm_hidden_size=HIDDEN, llm_num_layers=1, llm_num_heads=2, fusion_hidden_size=8,
                        **mmesid_stage_files)
    _, (train, _, _), model, _ = build("MMESID", "TimeToy", config_dict=config)
    missing, present = items_by_image(train.dataset, row_of_token, mask)
    tokens = train.dataset.field2id_token[train.dataset.iid_field]
    seen = []
    model.item_mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    items = torch.tensor(missing + present[:4])
    with torch.no_grad():
        model.item_input_embeddings(items)
    # eq. 16's input, one H-wide slot each: [collab proj, collab SID, text proj, text SID, image proj, image SID]
    slots = seen[0].view(len(items), 6, HIDDEN)
    sid = torch.load(mmesid_stage_files["mmesid_sid_file"], weights_only=True)
    for position, item in enumerate(items.tolist()):
        row = row_of_token[tokens[item]]
        projection = model.projections["image"]
        expected_projection = projection.weight.detach() @ torch.from_numpy(image[row]) + projection.bias.detach()
        codes = sid["codes"]["image"][int(tokens[item][1:])]
        expected_sid = sum(model.sid_tables["image"][level, codes[level]].detach() for level in range(LEVELS))
        if not mask[row]:
            expected_projection, expected_sid = torch.zeros(HIDDEN), torch.zeros(HIDDEN)
        torch.testing.assert_close(slots[position, 4], expected_projection, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(slots[position, 5], expected_sid, rtol=1e-5, atol=1e-5)
        # the item's text is there either way
        text_projection = model.projections["text"]
        torch.testing.assert_close(slots[position, 2], text_projection.weight.detach() @ torch.from_numpy(text[row])
                                   + text_projection.bias.detach(), rtol=1e-5, atol=1e-5)


def info_nce_written_out(query, key, temperature):
    """-1/n Σ_i log( exp(cos(q_i, k_i)/T) / Σ_j exp(cos(q_i, k_j)/T) ) (eqs. 14-15)."""
    total = 0.0
    for i in range(len(query)):
        logits = [F.cosine_similarity(query[i], key[j], dim=0) / temperature for j in range(len(key))]
        total = total - (logits[i] - torch.logsumexp(torch.stack(logits), dim=0))
    return total / len(query)


def test_rqvae_leaves_missing_images_out_of_the_image_losses():
    """With 5 of 14 images missing: the image reconstruction and RQ losses are those of the 9 present
    images alone (codebooks k-means-initialised on them), the alignment pairs only items with both,
    and the missing rows' contents change nothing."""
    generator = torch.Generator().manual_seed(0)
    n = 14
    features = {"collab": torch.randn(n, 6, generator=generator), "text": torch.randn(n, 5, generator=generator),
                "image": torch.randn(n, 7, generator=generator)}
    present = {"collab": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool),
               "image": torch.ones(n, dtype=torch.bool)}
    present["image"][[1, 4, 5, 9, 13]] = False
    present["collab"][2] = False  # one item also lacks E_c: it is in no alignment pair
    torch.manual_seed(0)
    model = MultimodalRQVAE({name: t.shape[1] for name, t in features.items()}, hidden_dims=[8], latent_dim=4,
                            n_levels=2, codebook_size=3, anchor="collab", recon_loss="mse", align_loss="infonce",
                            recon_weight=1.0, align_weight=0.5, rq_weight=1.0, temperature=0.2, kmeans_iters=3)
    reference = copy.deepcopy(model)  # codebooks not initialised yet: the first training call does it

    garbage = {**features, "image": features["image"].clone()}
    garbage["image"][~present["image"]] = 1e4
    torch.manual_seed(1)
    total, parts, _ = model.train()(garbage, present)

    # the same losses computed from the present rows only, each RQ-VAE called on its own rows
    torch.manual_seed(1)
    expected_total, quantized = 0.0, {}
    for name in ("collab", "text", "image"):
        rows = present[name]
        out = reference.rqvaes[name].train()(features[name][rows])
        recon = (out["reconstruction"] - features[name][rows]).pow(2).mean()
        rq = out["rq_loss"].mean()
        assert parts[f"recon_{name}"] == pytest.approx(recon.item(), rel=1e-5)
        assert parts[f"rq_{name}"] == pytest.approx(rq.item(), rel=1e-5)
        expected_total = expected_total + recon + rq
        quantized[name] = torch.zeros(n, 4).index_put((rows.nonzero().flatten(),), out["quantized"])
    for name in ("text", "image"):
        both = present["collab"] & present[name]
        align = info_nce_written_out(quantized["collab"][both], quantized[name][both], 0.2)
        assert parts[f"align_collab_{name}"] == pytest.approx(align.item(), rel=1e-5)
        expected_total = expected_total + 0.5 * align
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)


def test_mmesid_scores_an_item_without_image_by_its_other_channels(toy_without_some_images, mmesid_stage_files):
    """Eq. 18 for an item without an image: the image channel's weight goes to the others in
    proportion (w_j / (1 - w_v)); its table row (the projection bias alone) adds nothing."""
    root, row_of_token, text, image, mask = toy_without_some_images
    config = toy_config(root, llm_hidden_size=HIDDEN, llm_num_layers=1, llm_num_heads=2, fusion_hidden_size=8,
                        **mmesid_stage_files)
    _, (train, _, _), model, _ = build("MMESID", "TimeToy", config_dict=config)
    missing, present = items_by_image(train.dataset, row_of_token, mask)
    model.eval()
    user_state = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.full_scores(user_state)
        g = model.fusion_mlp
        for item in missing + present[:3]:
            softmax = torch.softmax(g(model.item_frequency_feature[item]) / model.fusion_temperature, -1)  # (x, c, t, v)
            if item in missing:
                softmax = torch.cat([softmax[:3] / (1 - softmax[3]), torch.zeros(1)])
            tables = [model.target_item_embedding.weight[item]] + [
                model.projections[name](model.feature_table(name)[item]) for name in ("collab", "text", "image")]
            expected = sum(weight * (user_state @ table) for weight, table in zip(softmax, tables))
            torch.testing.assert_close(full[:, item], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.item_scores(user_state, torch.full((3, 1), item))[:, 0], expected,
                                       rtol=1e-5, atol=1e-6)
    # the authors' temperature (0.001) makes the softmax one-hot: still finite when the winner is absent
    model.fusion_temperature = 1e-3
    with torch.no_grad():
        model.fusion_mlp[-1].weight.zero_()
        model.fusion_mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # the image channel wins alone
        weights = model.fusion_weights()
    assert torch.isfinite(weights).all() and (weights[missing, 3] == 0).all()
    torch.testing.assert_close(model.fusion_weights().sum(-1), torch.ones(model.n_items))
