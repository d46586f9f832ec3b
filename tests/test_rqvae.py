import itertools
import math

import pytest
import torch

from recbole_mm.model.layers.rqvae import (
    MultimodalRQVAE,
    ResidualQuantizer,
    balanced_code_indices,
    centred_distances,
    cluster_size_bounds,
    collision_statistics,
    constrained_kmeans,
    gaussian_mmd2,
    info_nce,
    kmeans,
    reconstruction_quality,
    sinkhorn_plan,
    size_constrained_assignment,
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


def test_reconstruction_quality_written_out_on_short_rows():
    # rows of norm < 1 (the clamp guards only zero rows) and a reconstruction that is not a scaled copy
    s = torch.tensor([[0.3, 0.4], [0.0, 0.1]], dtype=torch.float64)
    r = torch.tensor([[0.3, 0.0], [0.1, 0.1]], dtype=torch.float64)
    quality = reconstruction_quality(s, r)
    assert abs(quality["mse"] - (0.16 + 0.01) / 4) < 1e-12
    cosines = [0.3 * 0.3 / (0.5 * 0.3), 0.01 / (0.1 * 0.02 ** 0.5)]
    assert abs(quality["cosine"] - sum(cosines) / 2) < 1e-12
    assert abs(quality["relative_error"] - (0.4 / 0.5 + 0.1 / 0.1) / 2) < 1e-12


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


# ---- the authors' switches -------------------------------------------------------------------
def authors_sinkhorn_loop(distances, epsilon, n_iters):
    """layers.py's sinkhorn_algorithm, element by element: Q = exp(-d/eps) / sum; n_iters times
    (each row to sum 1, divided by B; each column to sum 1, divided by K); finally Q * B."""
    rows, cols = len(distances), len(distances[0])
    q = [[math.exp(-distances[i][j] / epsilon) for j in range(cols)] for i in range(rows)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iters):
        q = [[v / sum(row) / rows for v in row] for row in q]
        column_sums = [sum(q[i][j] for i in range(rows)) for j in range(cols)]
        q = [[q[i][j] / column_sums[j] / cols for j in range(cols)] for i in range(rows)]
    return [[v * rows for v in row] for row in q]


def test_sinkhorn_plan_equals_the_authors_loop():
    torch.manual_seed(0)
    distances = torch.rand(5, 3, dtype=torch.float64) * 2 - 1
    expected = torch.tensor(authors_sinkhorn_loop(distances.tolist(), 0.3, 7), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_plan(distances, 0.3, 7), expected)


def test_balanced_codes_are_argmax_of_the_plan_on_centred_distances():
    torch.manual_seed(1)
    residual, codebook = torch.randn(6, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    distances = [[sum((residual[i, d] - codebook[j, d]).item() ** 2 for d in range(2)) for j in range(3)] for i in range(6)]
    high, low = max(map(max, distances)), min(map(min, distances))
    middle = (high + low) / 2
    centred = [[(v - middle) / (high - middle + 1e-5) for v in row] for row in distances]
    torch.testing.assert_close(centred_distances(torch.tensor(distances, dtype=torch.float64)),
                               torch.tensor(centred, dtype=torch.float64))
    plan = authors_sinkhorn_loop(centred, 0.2, 30)
    expected = [max(range(3), key=lambda j: plan[i][j]) for i in range(6)]
    assert balanced_code_indices(residual, codebook, 0.2, 30).tolist() == expected


def test_sinkhorn_with_small_epsilon_gives_the_cheapest_balanced_assignment():
    # every row is nearest to code 0; balanced transport must give each code 2 rows
    residual = torch.tensor([[0.0, 0.1], [0.2, 0.0], [0.9, 0.0], [0.0, 0.8], [0.1, 0.1], [0.5, 0.5]], dtype=torch.float64)
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    cost = [[((residual[i] - codebook[j]) ** 2).sum().item() for j in range(3)] for i in range(6)]
    best = min((labels for labels in itertools.product(range(3), repeat=6) if all(labels.count(j) == 2 for j in range(3))),
               key=lambda labels: sum(cost[i][labels[i]] for i in range(6)))
    assert (residual[:, None] - codebook).pow(2).sum(-1).argmin(-1).tolist() == [0] * 6
    assert balanced_code_indices(residual, codebook, 0.003, 2000).tolist() == list(best)


def test_quantizer_balances_only_while_training_and_only_where_epsilon_is_positive():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(2, 3, 2, sinkhorn_epsilons=[0.0, 0.003], sinkhorn_iters=200).double()
    quantizer.initialized.fill_(True)
    z = 0.01 * torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        quantizer.codebooks[:] = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    quantizer.train()
    _, train_codes, _ = quantizer(z)
    quantizer.eval()
    _, eval_codes, _ = quantizer(z)
    residual = z - quantizer.codebooks.detach()[0, 0]
    assert train_codes[:, 0].tolist() == [0] * 6 and eval_codes[:, 0].tolist() == [0] * 6  # epsilon 0: nearest
    assert sorted(torch.bincount(train_codes[:, 1], minlength=3).tolist()) == [2, 2, 2]  # balanced
    assert eval_codes[:, 1].tolist() == (residual[:, None] - quantizer.codebooks.detach()[1]).pow(2).sum(-1).argmin(-1).tolist()


def test_sinkhorn_epsilons_need_one_per_level():
    with pytest.raises(ValueError, match="rqvae_sinkhorn_epsilons"):
        ResidualQuantizer(2, 3, 2, sinkhorn_epsilons=[0.0, 0.0, 0.003])


def test_cluster_size_bounds_follow_the_authors_rule():
    # vq_mm.py: size_min = min(B // (2 S), 50), size_max = 4 size_min (kept feasible)
    assert cluster_size_bounds(1024, 256) == (2, 8)
    assert cluster_size_bounds(512, 8) == (32, 128)
    assert cluster_size_bounds(40000, 256) == (50, 200)
    assert cluster_size_bounds(100000, 256) == (50, 391)  # 256 x 200 < 100000: max raised to ceil(B / S)
    assert cluster_size_bounds(300, 256) == (1, 4)


def test_size_constrained_assignment_equals_brute_force():
    torch.manual_seed(0)
    distances = torch.rand(7, 3, dtype=torch.float64)
    distances[:, 0] -= 1.0  # unconstrained, every point would join cluster 0
    labels = size_constrained_assignment(distances, size_min=2, size_max=3).tolist()
    feasible = [a for a in itertools.product(range(3), repeat=7) if all(2 <= a.count(j) <= 3 for j in range(3))]
    best = min(sum(distances[i, a[i]].item() for i in range(7)) for a in feasible)
    assert all(2 <= labels.count(j) <= 3 for j in range(3))
    assert abs(sum(distances[i, labels[i]].item() for i in range(7)) - best) < 1e-12


def test_constrained_kmeans_keeps_every_cluster_within_bounds():
    torch.manual_seed(0)
    # a dense blob and five far outliers: plain k-means++ seeds the outliers into clusters of one
    outliers = torch.tensor([[20.0, 0.0], [-20.0, 0.0], [0.0, 20.0], [0.0, -20.0], [20.0, 20.0]])
    points = torch.cat([torch.randn(95, 2) * 0.1, outliers])
    size_min, size_max = cluster_size_bounds(100, 10)
    assert (size_min, size_max) == (5, 20)
    centres, labels = constrained_kmeans(points, 10, n_iters=10, generator=torch.Generator().manual_seed(0))
    sizes = torch.bincount(labels, minlength=10)
    assert sizes.min() >= size_min and sizes.max() <= size_max
    for cluster in range(10):
        torch.testing.assert_close(centres[cluster], points[labels == cluster].mean(0))
    quantizer = ResidualQuantizer(1, 10, 2, codebook_init="constrained_kmeans")
    quantizer(points)
    assert bool(quantizer.initialized)
    assert not torch.allclose(quantizer.codebooks.detach()[0], kmeans(points, 10, 10, torch.Generator().manual_seed(0)))


def hand_built_two_level_quantizer(**options):
    quantizer = ResidualQuantizer(2, 2, 2, commitment_weight=1.0, **options).double()
    quantizer.initialized.fill_(True)
    with torch.no_grad():
        quantizer.codebooks[0] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        quantizer.codebooks[1] = torch.tensor([[0.5, 0.5], [-0.5, 0.0]])
    return quantizer


@pytest.mark.parametrize("path, reduction, expected_grad", [
    # by hand: z1=(1,2) -> code 1, r1=(0,1) -> code 0; z2=(-1,.5) -> code 0, r1=(-1,.5) -> code 1.
    # d/dz of mean_d (r - SG(c))² is 2 (r - c) / 2: level 1 gives r1; level 2 gives r1 - c2
    ("first_level", "sum", [[0.0, 1.0], [-1.0, 0.5]]),
    ("every_level", "sum", [[0.0 - 0.5, 1.0 + 0.5], [-1.0 - 0.5, 0.5 + 0.5]]),
    ("first_level", "mean", [[0.0, 0.5], [-0.5, 0.25]]),
    ("every_level", "mean", [[-0.25, 0.75], [-0.75, 0.5]]),
])
def test_commitment_gradient_path_and_level_reduction(path, reduction, expected_grad):
    quantizer = hand_built_two_level_quantizer(commitment_path=path, loss_reduction=reduction)
    z = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    _, codes, loss = quantizer(z)
    assert codes.tolist() == [[1, 0], [0, 1]]
    loss.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor(expected_grad, dtype=torch.float64))


def test_rq_loss_mean_is_the_sum_over_levels_divided_by_levels():
    quantizer = hand_built_two_level_quantizer(loss_reduction="mean")
    z = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    _, _, loss = quantizer(z)
    # (1 + alpha) * (mean_d (z - c1)² + mean_d (r1 - c2)²) / L, written out per row
    row1 = 2 * ((0.0**2 + 1.0**2) / 2 + ((0.0 - 0.5) ** 2 + (1.0 - 0.5) ** 2) / 2) / 2
    row2 = 2 * (((-1.0) ** 2 + 0.5**2) / 2 + ((-1.0 + 0.5) ** 2 + 0.5**2) / 2) / 2
    torch.testing.assert_close(loss, torch.tensor([row1, row2], dtype=torch.float64))


def test_tokenizer_optimiser_is_adamw_with_the_given_weight_decay():
    features, present = synthetic_modalities(n=16)
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [8], 4, n_levels=1, codebook_size=4,
                            anchor="collab", recon_loss="mse", align_loss="none")
    model(features, present)  # initialises the codebooks (no step)
    with torch.no_grad():  # off the k-means fixed point, where the codebook gradient is rounding noise
        for rqvae in model.rqvaes.values():
            rqvae.quantizer.codebooks.add_(0.1 * torch.randn_like(rqvae.quantizer.codebooks))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(features, present)[0].backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    lr, wd, eps = 1e-2, 5.0, 1e-8
    train_multimodal_rqvae(model, features, present, epochs=1, batch_size=16, learning_rate=lr, weight_decay=wd)
    for name, p in model.named_parameters():
        # AdamW's first step: p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g²
        g = grads[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_dead_codes_move_onto_residuals_level_by_level():
    torch.manual_seed(0)
    quantizer = random_quantizer(n_levels=2, codebook_size=6, dim=3)
    z = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        quantizer.codebooks[0, 2:] += 1e3  # four level-1 codes no row can pick
        quantizer.codebooks[1, 3:] -= 1e3  # at least three level-2 codes no row can pick
    before = quantizer.codebooks.detach().clone()
    moved = quantizer.reseed_dead_codes(z, torch.Generator().manual_seed(0))
    after = quantizer.codebooks.detach()
    # level 1: exactly the four unreachable codes moved, each onto a row of z; level 2: the codes that
    # no residual left by level 1's NEW codebook picks (found by scanning, brute_force_rq), each moved
    # onto one of those residuals
    _, level1_residuals = brute_force_rq(z, after[:1])
    level2_codes, _ = brute_force_rq(level1_residuals, before[1:2])
    dead = {0: set(range(2, 6)), 1: set(range(6)) - set(level2_codes[:, 0].tolist())}
    assert moved == [4, len(dead[1])] and len(dead[1]) >= 3
    for level, points in ((0, z), (1, level1_residuals)):
        for j in range(6):
            if j in dead[level]:
                assert min(float((after[level, j] - point).abs().max()) for point in points) < 1e-12
            else:
                assert torch.equal(after[level, j], before[level, j])
    codes, _ = brute_force_rq(z, after)
    assert len(set(codes[:, 0].tolist())) == 6  # a moved code is the nearest code of the row it sits on


def test_tokenizer_training_reseeds_only_when_asked():
    features, present = synthetic_modalities()
    runs = {}
    for reseed in (False, True):
        torch.manual_seed(0)
        model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [16], 8, n_levels=2,
                                codebook_size=16, anchor="collab")
        runs[reseed] = train_multimodal_rqvae(model, features, present, epochs=3, batch_size=64,
                                              learning_rate=3e-3, reseed_dead_codes=reseed)
    assert not any(key.startswith("reseeded_") for epoch in runs[False] for key in epoch)
    assert {"reseeded_collab", "reseeded_text", "reseeded_image"} <= set(runs[True][0])
    assert "reseeded_text" not in runs[True][-1]  # the last epoch's codes are the final ones


def brute_force_constrained_cost(distances, size_min, size_max):
    n_points, n_clusters = distances.shape
    feasible = [a for a in itertools.product(range(n_clusters), repeat=n_points)
                if all(size_min <= a.count(j) <= size_max for j in range(n_clusters))]
    return min(sum(distances[i, a[i]].item() for i in range(n_points)) for a in feasible)


@pytest.mark.parametrize("low, high", [(0.0, 0.05), (-1.0, -0.95)])
def test_size_constrained_assignment_with_costs_in_a_narrow_or_negative_range(low, high):
    """The mandatory-slot bonus must outweigh any cost difference whatever the costs' range and sign."""
    generator = torch.Generator().manual_seed(1)
    distances = low + (high - low) * torch.rand(6, 3, generator=generator, dtype=torch.float64)
    distances[:, 0] = low  # without the size bounds every point would join cluster 0
    labels = size_constrained_assignment(distances, size_min=1, size_max=4).tolist()
    assert all(1 <= labels.count(j) <= 4 for j in range(3))
    assert abs(sum(distances[i, labels[i]].item() for i in range(6)) - brute_force_constrained_cost(distances, 1, 4)) < 1e-12


def test_size_constrained_assignment_accepts_exactly_full_bounds_and_names_an_infeasible_one():
    distances = torch.rand(6, 3, dtype=torch.float64)
    assert len(size_constrained_assignment(distances, size_min=1, size_max=2)) == 6  # 6 = 3 x size_max
    assert len(size_constrained_assignment(distances, size_min=2, size_max=3)) == 6  # 6 = 3 x size_min
    with pytest.raises(ValueError, match=r"^cannot put 6 points into 3 clusters of 3-4 points\.$"):
        size_constrained_assignment(distances, size_min=3, size_max=4)
    with pytest.raises(ValueError, match=r"^cannot put 6 points into 3 clusters of 1-1 points\.$"):
        size_constrained_assignment(distances, size_min=1, size_max=1)


def test_constrained_kmeans_takes_as_many_points_as_codes_and_its_own_generator():
    points = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    centres, labels = constrained_kmeans(points, 4, size_bounds=(1, 1))
    assert sorted(labels.tolist()) == [0, 1, 2, 3]  # four points, four codes: one each
    with pytest.raises(ValueError, match=r"^k-means codebook init needs at least as many items in the first batch "
                                         r"\(3\) as codes \(4\): raise rqvae_batch_size or lower rqvae_codebook_size\.$"):
        constrained_kmeans(points[:3], 4)
    many = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global RNG must not matter, only the generator given
        runs.append(constrained_kmeans(many, 4, n_iters=2, generator=torch.Generator().manual_seed(5))[0])
    torch.testing.assert_close(runs[0], runs[1])


def test_collision_statistics_counts_pairs_and_reports_every_key():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [4, 5], [4, 6]])
    assert collision_statistics(codes) == {
        "items": 5, "distinct_ids": 4, "colliding_items": 2, "collision_rate": 0.4, "max_items_per_id": 2,
        "codes_used_per_level": [3, 4]}
    empty = collision_statistics(torch.zeros(0, 2, dtype=torch.long))
    assert empty["max_items_per_id"] == 0 and empty["colliding_items"] == 0 and empty["items"] == 0


def test_reconstruction_quality_is_per_row_and_names_its_keys():
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    reconstruction = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    quality = reconstruction_quality(features, reconstruction)
    assert set(quality) == {"mse", "cosine", "relative_error"}
    assert quality["cosine"] == pytest.approx(1 / math.sqrt(2))  # each row at 45 degrees
    assert quality["relative_error"] == pytest.approx((1.0 + 1.0) / 2)  # ||(0,1,0)||/1 and ||(0,0,2)||/2
    assert quality["mse"] == pytest.approx((1 + 4) / 6)


def small_mm_rqvae(**options):
    features, present = synthetic_modalities(n=16)
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [8], 4, n_levels=2, codebook_size=4,
                            anchor="collab", **options)
    return model, features, present


def test_mm_rqvae_defaults_are_the_papers_and_every_option_reaches_each_quantizer():
    model, _, _ = small_mm_rqvae()
    assert (model.recon_loss, model.align_loss) == ("mmd", "infonce")
    assert (model.recon_weight, model.align_weight, model.rq_weight) == (1.0, 1e-3, 1.0)
    assert (model.temperature, model.bandwidth_scale) == (0.1, 0.5)
    for rqvae in model.rqvaes.values():
        q = rqvae.quantizer
        assert (q.commitment_weight, q.kmeans_iters, q.codebook_init, q.sinkhorn_iters) == (1.0, 20, "kmeans", 50)
        assert (q.sinkhorn_epsilons, q.loss_reduction, q.commitment_path) == ([0.0, 0.0], "sum", "every_level")
    options = dict(commitment_weight=0.25, kmeans_iters=3, codebook_init="constrained_kmeans",
                   sinkhorn_epsilons=[0.0, 0.003], sinkhorn_iters=7, rq_reduction="mean", commitment_path="first_level")
    model, _, _ = small_mm_rqvae(**options)
    for rqvae in model.rqvaes.values():
        q = rqvae.quantizer
        assert (q.commitment_weight, q.kmeans_iters, q.codebook_init, q.sinkhorn_iters) == (0.25, 3, "constrained_kmeans", 7)
        assert (q.sinkhorn_epsilons, q.loss_reduction, q.commitment_path) == ([0.0, 0.003], "mean", "first_level")
    single = ResidualQuantizer(1, 3, 2)
    assert (single.commitment_weight, single.kmeans_iters, single.sinkhorn_iters) == (1.0, 20, 50)
    import inspect
    defaults = {k: v.default for k, v in inspect.signature(train_multimodal_rqvae).parameters.items()}
    assert (defaults["weight_decay"], defaults["seed"], defaults["reseed_dead_codes"]) == (0.01, 0, False)
    with pytest.raises(ValueError, match=r"alignment anchor 'audio' is not one of the modalities \['collab', 'text', 'image'\]"):
        MultimodalRQVAE({"collab": 6, "text": 8, "image": 8}, [8], 4, 2, 4, anchor="audio")
    assert MultimodalRQVAE({"text": 8, "image": 8}, [8], 4, 2, 4, anchor=None).anchor is None


@pytest.mark.parametrize("key, value, message", [
    ("codebook_init", "random", "rqvae_codebook_init='random': choose one of ('constrained_kmeans', 'kmeans')."),
    ("loss_reduction", "max", "rqvae_rq_reduction='max': choose one of ('mean', 'sum')."),
    ("commitment_path", "none", "rqvae_commitment_path='none': choose one of ('first_level', 'every_level')."),
    ("sinkhorn_epsilons", [0.1], "rqvae_sinkhorn_epsilons=[0.1]: give one epsilon >= 0 per level (3 levels, "
     "rqvae_levels), e.g. [0.0, 0.0, 0.003] (Sinkhorn on the last level only) or [0.0, 0.0, 0.0] (nearest code "
     "everywhere)."),
])
def test_quantizer_refuses_unknown_options_naming_the_key_and_the_choices(key, value, message):
    with pytest.raises(ValueError) as error:
        ResidualQuantizer(3, 4, 2, **{key: value})
    assert str(error.value) == message


@pytest.mark.parametrize("key, value, message", [
    ("recon_loss", "l1", "rqvae_recon_loss='l1': choose one of ('mmd', 'mse')."),
    ("align_loss", "cos", "rqvae_align_loss='cos': choose one of ('infonce', 'mmd', 'none')."),
])
def test_mm_rqvae_refuses_unknown_losses_naming_the_key_and_the_choices(key, value, message):
    with pytest.raises(ValueError) as error:
        MultimodalRQVAE({"text": 8}, [8], 4, 1, 4, **{key: value})
    assert str(error.value) == message


def test_codebooks_start_as_gaussians_of_variance_one_over_dim():
    torch.manual_seed(0)
    codebooks = ResidualQuantizer(2, 512, 64).codebooks.detach()
    assert codebooks.std().item() == pytest.approx(1 / 8, rel=0.02)
    assert codebooks.mean().abs().item() < 0.005


def test_every_level_gets_its_own_kmeans_codebook_on_the_first_training_batch():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(2, 4, 2, kmeans_iters=5)
    quantizer.train()
    z = torch.randn(40, 2) * 10
    quantizer(z)
    first, second = quantizer.codebooks.detach()
    assert not torch.allclose(first, second)


def test_mlp_has_relu_between_layers_and_none_after_the_last():
    from torch import nn

    from recbole_mm.model.layers.rqvae import mlp

    layers = list(mlp([4, 8, 6, 3]))
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(layer.in_features, layer.out_features) for layer in layers if isinstance(layer, nn.Linear)] == \
        [(4, 8), (8, 6), (6, 3)]


def test_mmd_needs_two_samples_a_side_and_uses_a_given_bandwidth_in_the_inputs_dtype():
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    gaussian_mmd2(x, y)  # two a side is enough
    for a, b in ((x[:1], y), (x, y[:1])):
        with pytest.raises(ValueError) as error:
            gaussian_mmd2(a, b)
        assert str(error.value) == "MMD needs at least two samples on each side: use a batch size >= 2."
    sigma2 = 0.3  # below 1 and not a float32 number: a float32 or clamped-at-1 bandwidth shows
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma2))  # noqa: E731
    expected = k(x[0], x[1]) + k(y[0], y[1]) - 2 * sum(k(a, b) for a in x for b in y) / 4
    assert gaussian_mmd2(x, y, sigma2=sigma2).item() == pytest.approx(expected, rel=1e-13, abs=0)


def test_kmeans_takes_exactly_as_many_points_as_clusters_and_names_the_counts():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    centres = kmeans(points, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(map(tuple, centres.tolist())) == sorted(map(tuple, points.tolist()))
    with pytest.raises(ValueError) as error:
        kmeans(points, 4)
    assert str(error.value) == ("k-means codebook init needs at least as many items in the first batch (3) as codes "
                                "(4): raise rqvae_batch_size or lower rqvae_codebook_size.")


def test_kmeans_reseeds_empty_clusters_at_data_points_reproducibly_from_its_generator():
    # three distinct points, each twice, and four clusters: k-means++ has to put a second seed on a point
    # already taken (every weight is 0), so one cluster stays empty and is re-seeded on every iteration
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]).repeat(2, 1)
    runs = []
    for global_seed in range(1, 6):
        torch.manual_seed(global_seed)  # the result must depend on the generator only
        runs.append(kmeans(points, 4, n_iters=3, generator=torch.Generator().manual_seed(7)))
    for run in runs[1:]:
        torch.testing.assert_close(run, runs[0], rtol=0, atol=0)
    centres = runs[0]
    assert torch.isfinite(centres).all()
    for centre in centres:  # a re-seeded centre sits on a data point; so does every filled one here
        assert (points - centre).norm(dim=-1).min() == 0
    for point in points[:3]:
        assert (centres - point).norm(dim=-1).min() == 0


def test_kmeans_plus_plus_puts_one_seed_in_each_far_apart_cluster():
    from recbole_mm.model.layers.rqvae import kmeans_plus_plus_seeds

    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[100.0 * i, 0.0] for i in range(8)])
    points = centres.repeat_interleave(20, dim=0) + torch.rand(160, 2, generator=generator)
    for seed in range(3):
        seeds = kmeans_plus_plus_seeds(points, 8, torch.Generator().manual_seed(seed))
        assert sorted((seeds[:, 0] / 100).round().long().tolist()) == list(range(8))


def test_mm_rqvae_total_loss_is_the_weighted_sum_of_its_parts():
    weights = dict(recon_weight=2.0, rq_weight=3.0, align_weight=0.5)
    model, features, present = small_mm_rqvae(recon_loss="mse", **weights)
    total, parts, _ = model(features, present)
    recon = sum(v for k, v in parts.items() if k.startswith("recon_"))
    rq = sum(v for k, v in parts.items() if k.startswith("rq_"))
    align = sum(v for k, v in parts.items() if k.startswith("align_"))
    assert {k for k in parts if k.startswith("align_")} == {"align_collab_text", "align_collab_image"}
    assert total.item() == pytest.approx(2.0 * recon + 3.0 * rq + 0.5 * align, rel=1e-5)


def test_mm_rqvae_losses_use_the_configured_temperature_and_bandwidth():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    infonce = MultimodalRQVAE({"x": 4, "y": 4}, [4], 4, 1, 2, anchor="x", temperature=0.7)
    assert infonce.alignment_loss(a, b).item() == pytest.approx(info_nce(a, b, 0.7).item(), rel=1e-6)
    by_mmd = MultimodalRQVAE({"x": 4, "y": 4}, [4], 4, 1, 2, anchor="x", align_loss="mmd", bandwidth_scale=2.0)
    assert by_mmd.alignment_loss(a, b).item() == pytest.approx(gaussian_mmd2(a, b, bandwidth_scale=2.0).item(), rel=1e-6)
    assert by_mmd.reconstruction_loss(a, b).item() == pytest.approx(gaussian_mmd2(a, b, bandwidth_scale=2.0).item(), rel=1e-6)
    assert gaussian_mmd2(a, b, bandwidth_scale=2.0).item() != pytest.approx(gaussian_mmd2(a, b).item(), rel=1e-3)
    by_mse = MultimodalRQVAE({"x": 4}, [4], 4, 1, 2, recon_loss="mse")
    assert by_mse.reconstruction_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)


def test_mm_rqvae_without_a_presence_mask_uses_every_row():
    model, features, present = small_mm_rqvae()
    model.eval()
    for rqvae in model.rqvaes.values():
        rqvae.quantizer.initialized.fill_(True)
    every_row = {name: torch.ones(16, dtype=torch.bool) for name in features}
    assert model(features)[1] == pytest.approx(model(features, every_row)[1], rel=1e-6)


def test_alignment_needs_two_shared_rows_and_skips_only_the_pair_that_lacks_them():
    model, features, present = small_mm_rqvae(recon_loss="mse")
    model.eval()
    for rqvae in model.rqvaes.values():
        rqvae.quantizer.initialized.fill_(True)
    present = {name: torch.ones(16, dtype=torch.bool) for name in features}
    present["text"][2:] = False   # text shares exactly two rows with collab: aligned
    present["image"][1:] = False  # image shares one: left out
    _, parts, _ = model(features, present)
    assert "align_collab_text" in parts and "align_collab_image" not in parts
    present["text"][1] = False    # now text (which comes before image) shares one row, image all of them
    present["image"][:] = True
    _, parts, _ = model(features, present)
    assert "align_collab_text" not in parts and "align_collab_image" in parts


def test_tokenizer_history_is_the_mean_over_batches_and_is_logged_per_epoch():
    model, features, present = small_mm_rqvae(recon_loss="mse", align_loss="none")
    present = {name: torch.ones(16, dtype=torch.bool) for name in features}
    logged = []
    # learning rate 0: every batch sees the same weights (after the first batch's codebook init), so the mean of
    # the two 8-row batches' row-mean losses is the full batch's
    history = train_multimodal_rqvae(model, features, present, epochs=2, batch_size=8, learning_rate=0.0,
                                     weight_decay=0.0, log=logged.append)
    model.eval()  # no Sinkhorn here, so eval mode picks the training codes
    _, parts, _ = model(features, present)
    for epoch in history:
        for key, value in parts.items():
            assert epoch[key] == pytest.approx(value, rel=1e-5), key
    assert logged == [f"MM-RQ-VAE epoch {e}: " + ", ".join(f"{k}={v:.4f}" for k, v in history[e].items())
                      for e in range(2)]


def test_tokenizer_training_reseeds_after_every_epoch_but_the_last():
    features, present = synthetic_modalities(n=32)
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [8], 4, n_levels=2, codebook_size=8,
                            anchor="collab")
    history = train_multimodal_rqvae(model, features, present, epochs=3, batch_size=16, learning_rate=3e-3,
                                     reseed_dead_codes=True)
    assert all("reseeded_text" in epoch for epoch in history[:-1]) and "reseeded_text" not in history[-1]


def test_kmeans_runs_twenty_lloyd_steps_by_default(monkeypatch):
    from recbole_mm.model.layers import rqvae

    calls = []
    real = rqvae.nearest_code_indices
    monkeypatch.setattr(rqvae, "nearest_code_indices", lambda *args: calls.append(1) or real(*args))
    kmeans(torch.randn(12, 2, generator=torch.Generator().manual_seed(0)), 3)  # no early stop: every step runs
    assert len(calls) == 20


def test_constrained_kmeans_stops_after_twenty_assignments_by_default(monkeypatch):
    from recbole_mm.model.layers import rqvae

    calls = []

    def never_settling(distances, size_min, size_max):  # a different labelling every call: no convergence
        calls.append(1)
        return torch.arange(distances.shape[0]).roll(len(calls)) % distances.shape[1]
    monkeypatch.setattr(rqvae, "size_constrained_assignment", never_settling)
    constrained_kmeans(torch.randn(12, 2, generator=torch.Generator().manual_seed(0)), 3)
    assert len(calls) == 20


def test_info_nce_default_temperature_is_a_tenth():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    cosine = torch.tensor([[float(q @ k / (q.norm() * k.norm())) for k in key] for q in query]) / 0.1
    expected = -sum(cosine[i, i] - torch.logsumexp(cosine[i], dim=0) for i in range(5)) / 5  # eq. 15 written out
    torch.testing.assert_close(info_nce(query, key), expected)


def test_kmeans_plus_plus_weighs_by_distance_on_tiny_scale_data_too():
    """D² sampling whatever the data's scale: here the total squared distance is far below 1."""
    from recbole_mm.model.layers.rqvae import kmeans_plus_plus_seeds

    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1e-3 * i, 0.0] for i in range(8)])
    points = centres.repeat_interleave(20, dim=0) + 1e-6 * torch.rand(160, 2, generator=generator)
    assert float((points - points[0]).pow(2).sum()) < 0.01
    for seed in range(3):
        seeds = kmeans_plus_plus_seeds(points, 8, torch.Generator().manual_seed(seed))
        assert sorted((seeds[:, 0] / 1e-3).round().long().tolist()) == list(range(8))


@pytest.mark.parametrize("n_items, steps_per_epoch", [(18, 2), (17, 1), (32, 2)])
def test_tokenizer_training_steps_on_every_batch_of_at_least_two_items(monkeypatch, n_items, steps_per_epoch):
    """A last batch of one item is skipped (MMD and InfoNCE need two); a last batch of two is a step."""
    features, present = synthetic_modalities(n=n_items)
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [8], 4, n_levels=1, codebook_size=4,
                            anchor="collab", recon_loss="mse")
    train_multimodal_rqvae(model, features, present, epochs=2, batch_size=16, learning_rate=1e-3)
    assert len(steps) == 2 * steps_per_epoch


def test_tokenizer_training_draws_batches_and_reseeding_from_its_seed_alone():
    """With the codebooks already initialised, a run depends on ``seed`` only (the first batch's
    initialisation, when it happens inside training, draws from the global RNG: RecBole's init_seed)."""
    import copy

    features, present = synthetic_modalities()
    torch.manual_seed(0)
    model = MultimodalRQVAE({k: v.shape[1] for k, v in features.items()}, [16], 8, n_levels=2, codebook_size=16,
                            anchor="collab")
    with torch.no_grad():
        for name, rqvae in model.rqvaes.items():
            rqvae.quantizer.initialize_codebooks(rqvae.encoder(features[name][present[name]][:32]),
                                                 torch.Generator().manual_seed(1))
    runs = {}
    for global_seed, seed in [(1, 5), (2, 5), (1, 6)]:
        trained = copy.deepcopy(model)
        torch.manual_seed(global_seed)
        history = train_multimodal_rqvae(trained, features, present, epochs=3, batch_size=24, learning_rate=3e-3,
                                         seed=seed, reseed_dead_codes=True)
        assert history[0]["reseeded_text"] > 0  # the re-seeding draws happen
        runs[global_seed, seed] = trained.state_dict()
    for key, value in runs[1, 5].items():
        torch.testing.assert_close(runs[2, 5][key], value, rtol=0, atol=0)
    assert any(not torch.equal(runs[1, 6][key], value) for key, value in runs[1, 5].items())


def test_kmeans_plus_plus_first_seed_and_kmeans_reseeds_are_uniform_over_every_row(monkeypatch):
    """Both draws cover every data point: the first row and rows past the feature count too."""
    from recbole_mm.model.layers import rqvae

    points = torch.tensor([[float(i), float(i * i)] for i in range(6)])  # 6 distinct rows, 2 features
    firsts = {int((points == rqvae.kmeans_plus_plus_seeds(points, 1, torch.Generator().manual_seed(s))[0])
                  .all(-1).nonzero()) for s in range(200)}
    assert firsts == set(range(6))
    # seeds far from every point leave cluster 1 empty after the first assignment: it is re-seeded
    monkeypatch.setattr(rqvae, "kmeans_plus_plus_seeds", lambda p, k, g: torch.tensor([[2.5, 6.0], [1e6, 1e6]]))
    reseeded = {int((points == kmeans(points, 2, n_iters=1, generator=torch.Generator().manual_seed(s))[1])
                    .all(-1).nonzero()) for s in range(200)}
    assert reseeded == set(range(6))
