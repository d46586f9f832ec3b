import math

import torch

from recbole_mm.model.layers.rqvae import (
    MultimodalRQVAE,
    ResidualQuantizer,
    collision_statistics,
    gaussian_mmd2,
    info_nce,
    kmeans,
    reconstruction_quality,
    train_multimodal_rqvae,
)


def random_quantizer(n_levels=3, codebook_size=5, dim=4, commitment=0.25, seed=0):
    torch.manual_seed(seed)
    quantizer = ResidualQuantizer(n_levels, codebook_size, dim, commitment_weight=commitment).double()
    quantizer.initialized.fill_(True)  # keep the random codebooks
    return quantizer


def brute_force_rq(z, codebooks):
    """Per row, per level: scan every code for the smallest squared distance, subtract it."""
    codes, finals = [], []
    for row in z:
        residual, row_codes = row.clone(), []
        for codebook in codebooks:
            best, best_distance = None, math.inf
            for j, code in enumerate(codebook):
                distance = sum((residual[d] - code[d]).item() ** 2 for d in range(len(code)))
                if distance < best_distance:
                    best, best_distance = j, distance
            row_codes.append(best)
            residual = residual - codebook[best]
        codes.append(row_codes)
        finals.append(residual)
    return torch.tensor(codes), torch.stack(finals)


def test_rq_step_equals_brute_force_nearest_code_search():
    quantizer = random_quantizer()
    z = torch.randn(7, 4, dtype=torch.float64)
    _, codes, _ = quantizer(z)
    expected_codes, _ = brute_force_rq(z, quantizer.codebooks.detach())
    assert torch.equal(codes, expected_codes)


def test_residual_reconstruction_identity():
    quantizer = random_quantizer()
    z = torch.randn(6, 4, dtype=torch.float64)
    quantized, codes, _ = quantizer(z)
    _, final_residual = brute_force_rq(z, quantizer.codebooks.detach())
    chosen_sum = sum(quantizer.codebooks[level, codes[:, level]] for level in range(quantizer.n_levels))
    torch.testing.assert_close(quantized, chosen_sum)  # forward value of ẑ = Σ_l CE_{SID^l}
    torch.testing.assert_close(quantizer.decode_codes(codes), chosen_sum)
    torch.testing.assert_close(chosen_sum + final_residual, z)  # z = ẑ + r_L


def test_rq_loss_matches_eq5_and_straight_through_gradient():
    quantizer = random_quantizer(commitment=0.25)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    quantized, codes, loss = quantizer(z)
    expected = torch.zeros(5, dtype=torch.float64)
    residual = z.detach().clone()
    for level in range(quantizer.n_levels):
        code = quantizer.codebooks.detach()[level, codes[:, level]]
        expected += (1 + 0.25) * ((residual - code) ** 2).mean(-1)
        residual = residual - code
    torch.testing.assert_close(loss, expected)

    weights = torch.randn(5, 4, dtype=torch.float64)
    (quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # straight-through: dẑ/dz = identity
    assert quantizer.codebooks.grad is None


def test_rq_loss_gradients_split_between_codebook_and_encoder_terms():
    quantizer = random_quantizer(commitment=0.0)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _, _, loss = quantizer(z)
    loss.sum().backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0  # commitment 0: only codebooks move
    assert torch.count_nonzero(quantizer.codebooks.grad) > 0


def test_kmeans_init_recovers_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    points = centres.repeat_interleave(25, dim=0) + 0.1 * torch.randn(100, 2)
    found = kmeans(points, 4, n_iters=10, generator=torch.Generator().manual_seed(3))
    for centre in centres:
        assert (found - centre).norm(dim=-1).min() < 0.2

    quantizer = ResidualQuantizer(1, 4, 2)
    quantizer.train()
    quantizer(points)
    assert bool(quantizer.initialized)
    for centre in centres:
        assert (quantizer.codebooks.detach()[0] - centre).norm(dim=-1).min() < 0.2


def test_kmeans_rejects_batch_smaller_than_codebook():
    try:
        kmeans(torch.randn(3, 2), 4)
    except ValueError as error:
        assert "rqvae_batch_size" in str(error)
    else:
        raise AssertionError("expected a clear error")


def test_mmd_equals_double_loop_formula():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64) + 0.5
    pooled = torch.cat([x, y])
    mean_sq = sum(((a - b) ** 2).sum() for a in pooled for b in pooled) / len(pooled) ** 2
    sigma2 = 0.5 * mean_sq

    def k(a, b):
        return torch.exp(-((a - b) ** 2).sum() / (2 * sigma2))

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / (5 * 4)
    torch.testing.assert_close(gaussian_mmd2(x, y), xx + yy - 2 * xy)
    torch.testing.assert_close(gaussian_mmd2(x, y, sigma2=1.3),
                               gaussian_mmd2(x, y, sigma2=torch.tensor(1.3, dtype=torch.float64)))


def test_info_nce_equals_hand_computation():
    torch.manual_seed(0)
    query, key = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    temperature = 0.2
    total = 0.0
    for i in range(4):
        sims = [torch.dot(query[i], key[j]) / (query[i].norm() * key[j].norm()) / temperature for j in range(4)]
        total += -math.log(math.exp(sims[i]) / sum(math.exp(s) for s in sims))
    torch.testing.assert_close(info_nce(query, key, temperature).item(), total / 4)


def test_collision_statistics_on_handmade_codes():
    codes = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 1], [0, 1]])
    stats = collision_statistics(codes)
    assert stats["distinct_ids"] == 3 and stats["colliding_items"] == 3 and stats["max_items_per_id"] == 3
    assert stats["codes_used_per_level"] == [2, 2] and abs(stats["collision_rate"] - 0.6) < 1e-12


def test_reconstruction_quality_perfect_and_scaled():
    s = torch.randn(6, 3)
    assert reconstruction_quality(s, s)["mse"] == 0.0
    assert abs(reconstruction_quality(s, 2 * s)["relative_error"] - 1.0) < 1e-6


def synthetic_modalities(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=generator)
    features = {
        "collab": latent @ torch.randn(4, 6, generator=generator),
        "text": latent @ torch.randn(4, 8, generator=generator) + 0.1 * torch.randn(n, 8, generator=generator),
        "image": latent @ torch.randn(4, 8, generator=generator),
    }
    present = {name: torch.ones(n, dtype=torch.bool) for name in features}
    present["image"][::5] = False  # missing images are left out of the image losses
    return features, present


def test_mm_rqvae_trains_with_every_loss_switch():
    features, present = synthetic_modalities()
    for recon, align in [("mmd", "infonce"), ("mse", "infonce"), ("mmd", "mmd"), ("mse", "none")]:
        torch.manual_seed(0)
        model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [16], 8, n_levels=2,
                                codebook_size=8, anchor="collab", recon_loss=recon, align_loss=align,
                                align_weight=0.1)
        history = train_multimodal_rqvae(model, features, present, epochs=15, batch_size=32, learning_rate=3e-3)
        assert history[-1]["loss"] < history[0]["loss"], (recon, align, history[0], history[-1])
        assert ("align_collab_image" in history[0]) == (align != "none")
        codes, quantized, recon_out = model.encode("text", features["text"])
        assert codes.shape == (64, 2) and codes.max() < 8 and quantized.shape == (64, 8)
        assert recon_out.shape == features["text"].shape


def test_alignment_pairs_rows_present_in_both_modalities():
    features, present = synthetic_modalities(n=10)
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [8], 4, n_levels=1, codebook_size=4,
                            anchor="collab", recon_loss="mse", align_loss="infonce", align_weight=1.0)
    model.eval()
    for rqvae in model.rqvaes.values():
        rqvae.quantizer.initialized.fill_(True)
    _, parts, outputs = model(features, present)
    both = present["collab"] & present["image"]
    anchor_q = model.rqvaes["collab"](features["collab"])["quantized"][both]
    image_q = model.rqvaes["image"](features["image"])["quantized"][both]
    assert abs(parts["align_collab_image"] - info_nce(anchor_q, image_q, 0.1).item()) < 1e-6
