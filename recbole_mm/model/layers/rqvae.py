"""Residual-quantised VAEs for semantic IDs, and the multimodal MM-RQ-VAE of MME-SID (Sec. 4.2.2).

- ``ResidualQuantizer``: L levels x S codes, codebook init on the first training batch (k-means, or
  the authors' size-constrained k-means), straight-through gradients, RQ loss with commitment
  (eq. 5: summed over levels, or averaged as the authors' code does), optional Sinkhorn-balanced code
  assignment per level while training (the authors' ``sk_epsilons``).
- ``RQVAE``: encoder MLP -> residual quantiser -> decoder MLP, one per modality.
- ``MultimodalRQVAE``: one RQ-VAE per modality and the loss of eq. 11:
  ``recon_weight * L_recon + align_weight * L_align + rq_weight * sum_j L_RQ`` with MMD² (Gaussian
  kernel) or MSE reconstruction and InfoNCE or MMD² alignment of the quantised anchor modality
  (collaborative) to every other modality.
- ``collision_statistics`` / ``reconstruction_quality``: what a trained tokenizer is judged by.
"""

from collections import Counter
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RECON_LOSSES = ("mmd", "mse")
ALIGN_LOSSES = ("infonce", "mmd", "none")
CODEBOOK_INITS = ("constrained_kmeans", "kmeans")
RQ_LOSS_REDUCTIONS = ("mean", "sum")
COMMITMENT_PATHS = ("first_level", "every_level")


# --------------------------------------------------------------------------------------------
# Residual quantisation
# --------------------------------------------------------------------------------------------
def nearest_code_indices(residual, codebook):
    """argmin_j ||r - CE_j||² per row (eq. 2), via ||r||² - 2 r·CE + ||CE||² (no (B, S, d) tensor)."""
    distances = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ codebook.t() + codebook.pow(2).sum(-1)
    return distances.argmin(dim=-1)


def kmeans_plus_plus_seeds(points, n_clusters: int, generator: Optional[torch.Generator] = None):
    """k-means++: each next seed is drawn with probability proportional to its squared distance to
    the nearest seed so far (uniform when every point already coincides with a seed)."""
    first = torch.randint(0, points.shape[0], (1,), generator=generator).item()
    centres = [points[first]]
    closest = (points - points[first]).pow(2).sum(-1)
    for _ in range(1, n_clusters):
        weights = closest.double().cpu()
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        chosen = torch.multinomial(weights, 1, generator=generator).item()
        centres.append(points[chosen])
        closest = torch.minimum(closest, (points - points[chosen]).pow(2).sum(-1))
    return torch.stack(centres).clone()


def kmeans(points, n_clusters: int, n_iters: int = 20, generator: Optional[torch.Generator] = None):
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded at random points."""
    if points.shape[0] < n_clusters:
        raise ValueError(
            f"k-means codebook init needs at least as many items in the first batch ({points.shape[0]}) as codes "
            f"({n_clusters}): raise rqvae_batch_size or lower rqvae_codebook_size."
        )
    centres = kmeans_plus_plus_seeds(points, n_clusters, generator)
    for _ in range(n_iters):
        assignment = nearest_code_indices(points, centres)
        counts = torch.bincount(assignment, minlength=n_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().flatten()
        if len(empty):
            reseed = torch.randint(0, points.shape[0], (len(empty),), generator=generator)
            centres[empty] = points[reseed.to(points.device)]
    return centres


def cluster_size_bounds(n_points: int, n_clusters: int):
    """The authors' bounds for the first-batch init (``vq_mm.py``): at least min(B // 2S, 50) and at
    most 4x that many points per code; raised to 1 and to ceil(B / S) where the rule would make the
    problem infeasible (their solver refuses such batches)."""
    size_min = max(1, min(n_points // (2 * n_clusters), 50))
    size_max = max(4 * size_min, -(-n_points // n_clusters))
    return size_min, size_max


def size_constrained_assignment(distances, size_min: int, size_max: int):
    """Labels minimising Σ_i distances[i, label_i] with every cluster holding size_min..size_max rows.

    Exact, as an assignment problem: each cluster is replicated into ``size_max`` slots, of which the
    first ``size_min`` carry a bonus larger than any possible cost difference, so an optimum fills
    every mandatory slot (feasible when S·size_min <= B <= S·size_max) and minimises the cost among
    such fillings. Solved by SciPy's ``linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment

    cost = distances.detach().double().cpu().numpy()
    n_points, n_clusters = cost.shape
    if not n_clusters * size_min <= n_points <= n_clusters * size_max:
        raise ValueError(f"cannot put {n_points} points into {n_clusters} clusters of {size_min}-{size_max} points.")
    bonus = n_points * (cost.max() - cost.min() + 1.0)
    mandatory = np.tile(np.arange(size_max) < size_min, n_clusters)
    slots = np.repeat(cost, size_max, axis=1) - bonus * mandatory
    _, slot = linear_sum_assignment(slots)
    return torch.as_tensor(slot // size_max, device=distances.device)


def constrained_kmeans(points, n_clusters: int, n_iters: int = 20, size_bounds=None,
                       generator: Optional[torch.Generator] = None):
    """Lloyd's k-means whose assignment step bounds every cluster's size (the authors' init, there by
    the ``k-means-constrained`` package: min-cost-flow assignment, 10 restarts; here one k-means++
    start). ``size_bounds`` defaults to ``cluster_size_bounds``. Returns (centres, labels of the last
    assignment, whose group means the centres are); no cluster can be empty."""
    if points.shape[0] < n_clusters:
        raise ValueError(
            f"k-means codebook init needs at least as many items in the first batch ({points.shape[0]}) as codes "
            f"({n_clusters}): raise rqvae_batch_size or lower rqvae_codebook_size."
        )
    size_min, size_max = size_bounds or cluster_size_bounds(points.shape[0], n_clusters)
    centres = kmeans_plus_plus_seeds(points, n_clusters, generator)
    labels = None
    for _ in range(n_iters):
        new_labels = size_constrained_assignment(squared_distances(points, centres), size_min, size_max)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=n_clusters).to(points.dtype)
        centres = torch.zeros_like(centres).index_add_(0, labels, points) / counts[:, None]
    return centres, labels


def centred_distances(distances):
    """Distances shifted and scaled into [-1, 1] over the whole batch (the authors'
    ``center_distance_for_constraint``), so one Sinkhorn epsilon suits any distance scale."""
    middle = (distances.max() + distances.min()) / 2
    amplitude = distances.max() - middle + 1e-5
    return (distances - middle) / amplitude


def sinkhorn_plan(distances, epsilon: float, n_iters: int):
    """Entropic transport plan between B rows and K codes with uniform marginals (the authors'
    ``sinkhorn_algorithm``: Q = exp(-d/ε), normalised, then ``n_iters`` rounds of row sums -> 1/B and
    column sums -> 1/K, finally times B). Computed in log space: the same plan without exp overflow."""
    log_q = -distances.double() / epsilon
    n_rows, n_codes = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - np.log(n_rows)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - np.log(n_codes)
    return torch.exp(log_q + np.log(n_rows))


def balanced_code_indices(residual, codebook, epsilon: float, n_iters: int):
    """Code per row from the Sinkhorn plan over centred squared distances (argmax per row): codes
    are spread evenly over the batch instead of each row taking its nearest code."""
    distances = squared_distances(residual, codebook)
    return sinkhorn_plan(centred_distances(distances), epsilon, n_iters).argmax(dim=-1)


class ResidualQuantizer(nn.Module):
    """``n_levels`` codebooks of ``codebook_size`` codes in ``dim`` dimensions (eq. 2).

    ``codebook_init``: ``kmeans`` (k-means++ and Lloyd) or ``constrained_kmeans`` (cluster sizes
    bounded, the authors') on the first training batch's residuals, level by level.
    ``sinkhorn_epsilons``: per level, ε > 0 assigns codes by a Sinkhorn plan while training (0: the
    nearest code); evaluation always takes the nearest code.
    ``loss_reduction``: ``sum`` over levels (eq. 5) or ``mean`` (the authors' code).
    ``commitment_path``: ``every_level`` (eq. 5 as written) or ``first_level`` (the authors' code: each
    later residual is detached, so only level 1's commitment term reaches the encoder).
    """

    def __init__(self, n_levels: int, codebook_size: int, dim: int, commitment_weight: float = 1.0,
                 kmeans_iters: int = 20, codebook_init: str = "kmeans", sinkhorn_epsilons: Optional[Sequence[float]] = None,
                 sinkhorn_iters: int = 50, loss_reduction: str = "sum", commitment_path: str = "every_level"):
        super().__init__()
        if codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"rqvae_codebook_init={codebook_init!r}: choose one of {CODEBOOK_INITS}.")
        if loss_reduction not in RQ_LOSS_REDUCTIONS:
            raise ValueError(f"rqvae_rq_reduction={loss_reduction!r}: choose one of {RQ_LOSS_REDUCTIONS}.")
        if commitment_path not in COMMITMENT_PATHS:
            raise ValueError(f"rqvae_commitment_path={commitment_path!r}: choose one of {COMMITMENT_PATHS}.")
        sinkhorn_epsilons = [0.0] * n_levels if sinkhorn_epsilons is None else [float(e) for e in sinkhorn_epsilons]
        if len(sinkhorn_epsilons) != n_levels or min(sinkhorn_epsilons) < 0:
            raise ValueError(
                f"rqvae_sinkhorn_epsilons={sinkhorn_epsilons}: give one epsilon >= 0 per level ({n_levels} levels, "
                f"rqvae_levels), e.g. {[0.0] * (n_levels - 1) + [0.003]} (Sinkhorn on the last level only) or "
                f"{[0.0] * n_levels} (nearest code everywhere)."
            )
        self.n_levels, self.codebook_size, self.dim = n_levels, codebook_size, dim
        self.commitment_weight = commitment_weight
        self.kmeans_iters = kmeans_iters
        self.codebook_init = codebook_init
        self.sinkhorn_epsilons, self.sinkhorn_iters = sinkhorn_epsilons, sinkhorn_iters
        self.loss_reduction, self.commitment_path = loss_reduction, commitment_path
        self.codebooks = nn.Parameter(torch.randn(n_levels, codebook_size, dim) / dim**0.5)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize_codebooks(self, z, generator: Optional[torch.Generator] = None):
        """Codebook l from the level-l residuals of ``z`` (levels in order; each level's residual
        uses the codes the training forward would choose)."""
        residual = z.detach().float()
        for level in range(self.n_levels):
            self._initialize_level(level, residual, generator)
            residual = residual - self.codebooks[level, self.code_indices(level, residual)].float()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _initialize_level(self, level, residual, generator=None):
        points = residual.detach().float()
        if self.codebook_init == "constrained_kmeans":
            centres, _ = constrained_kmeans(points, self.codebook_size, self.kmeans_iters, generator=generator)
        else:
            centres = kmeans(points, self.codebook_size, self.kmeans_iters, generator)
        self.codebooks.data[level] = centres.to(self.codebooks.dtype)

    def code_indices(self, level, residual):
        """SID^l per row: Sinkhorn-balanced while training at a level with ε > 0, else the nearest code."""
        codebook = self.codebooks[level].detach()
        epsilon = self.sinkhorn_epsilons[level]
        if self.training and epsilon > 0:
            return balanced_code_indices(residual.detach(), codebook, epsilon, self.sinkhorn_iters)
        return nearest_code_indices(residual.detach(), codebook)

    @torch.no_grad()
    def reseed_dead_codes(self, z, generator: Optional[torch.Generator] = None):
        """Move every code that no row of ``z`` picks (nearest code) onto one of that level's residuals,
        drawn with probability proportional to its squared quantisation error (the worst-served rows
        first), level by level; later levels see the residuals the re-seeded codes leave. Returns the
        number of codes moved per level."""
        residual = z.detach().to(self.codebooks.dtype)
        moved = []
        for level in range(self.n_levels):
            codebook = self.codebooks.data[level]
            index = nearest_code_indices(residual, codebook)
            dead = torch.nonzero(torch.bincount(index, minlength=self.codebook_size) == 0).squeeze(1)
            if len(dead):
                error = (residual - codebook[index]).pow(2).sum(dim=-1)
                weights = error if float(error.sum()) > 0 else torch.ones_like(error)
                rows = torch.multinomial(weights.cpu(), len(dead), replacement=len(dead) > len(weights),
                                         generator=generator).to(residual.device)
                codebook[dead] = residual[rows]
                index = nearest_code_indices(residual, codebook)
            moved.append(len(dead))
            residual = residual - codebook[index]
        return moved

    def decode_codes(self, codes):
        """ẑ = Σ_l CE^l_{SID^l} for codes (..., L)."""
        levels = torch.arange(self.n_levels, device=codes.device)
        return self.codebooks[levels, codes].sum(dim=-2)

    def forward(self, z):
        """Returns (ẑ with straight-through gradient to z, codes (B, L), per-row RQ loss (B,)).

        Per-row loss (eq. 5) = Σ_l mean_d (SG(r_{l-1}) - CE)² + commitment_weight · mean_d (r_{l-1} - SG(CE))²,
        divided by L with ``loss_reduction: mean``.
        """
        initializing = self.training and not bool(self.initialized)
        residual = z
        quantized = torch.zeros_like(z)
        codes, loss = [], z.new_zeros(z.shape[0])
        for level in range(self.n_levels):
            if initializing:
                self._initialize_level(level, residual)
            index = self.code_indices(level, residual)
            chosen = self.codebooks[level][index]
            loss = loss + (residual.detach() - chosen).pow(2).mean(-1)
            loss = loss + self.commitment_weight * (residual - chosen.detach()).pow(2).mean(-1)
            quantized = quantized + chosen
            residual = residual - chosen.detach()
            if self.commitment_path == "first_level":
                residual = residual.detach()
            codes.append(index)
        if initializing:
            self.initialized.fill_(True)
        if self.loss_reduction == "mean":
            loss = loss / self.n_levels
        straight_through = z + (quantized - z).detach()
        return straight_through, torch.stack(codes, dim=-1), loss


def mlp(dims: Sequence[int]):
    """Linear layers with ReLU between them (none after the last)."""
    layers = []
    for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if index < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """s -> encoder -> z -> residual quantiser -> ẑ -> decoder -> ŝ (one modality)."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int, n_levels: int,
                 codebook_size: int, commitment_weight: float = 1.0, kmeans_iters: int = 20, **quantizer_options):
        super().__init__()
        dims = [input_dim, *hidden_dims, latent_dim]
        self.encoder = mlp(dims)
        self.quantizer = ResidualQuantizer(n_levels, codebook_size, latent_dim, commitment_weight, kmeans_iters,
                                           **quantizer_options)
        self.decoder = mlp(dims[::-1])

    def forward(self, s):
        z = self.encoder(s)
        quantized, codes, rq_loss = self.quantizer(z)
        return {"quantized": quantized, "codes": codes, "rq_loss": rq_loss,
                "reconstruction": self.decoder(quantized)}


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def squared_distances(a, b):
    """||a_i − b_j||² for all pairs, by the expansion ||a||² + ||b||² − 2 a·b (clamped at 0)."""
    return (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2 * a @ b.t()).clamp(min=0)


def gaussian_mmd2(x, y, sigma2=None, bandwidth_scale: float = 0.5):
    """Unbiased MMD² between samples x (n, d) and y (m, d), k(a, b) = exp(-||a-b||² / (2σ²)) (eq. 10):
    mean_{i≠i'} k(x_i, x_i') + mean_{j≠j'} k(y_j, y_j') − 2 mean_{i,j} k(x_i, y_j).
    One pooled distance matrix serves the bandwidth and all three kernel blocks."""
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least two samples on each side: use a batch size >= 2.")
    pooled = torch.cat([x, y])
    distances = squared_distances(pooled, pooled)
    if sigma2 is None:
        sigma2 = bandwidth_scale * distances.detach().mean()
    sigma2 = torch.clamp(torch.as_tensor(sigma2, dtype=x.dtype, device=x.device), min=1e-12)
    kernel = torch.exp(-distances / (2 * sigma2))

    def off_diagonal_mean(block):
        size = block.shape[0]
        return (block.sum() - block.diagonal().sum()) / (size * (size - 1))

    return off_diagonal_mean(kernel[:n, :n]) + off_diagonal_mean(kernel[n:, n:]) - 2 * kernel[:n, n:].mean()


def info_nce(query, key, temperature: float = 0.1):
    """InfoNCE with in-batch negatives and cosine similarity (eqs. 14–15): row i of ``key`` is the
    positive of row i of ``query``; every other row of ``key`` is a negative."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).t() / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


# --------------------------------------------------------------------------------------------
# MM-RQ-VAE
# --------------------------------------------------------------------------------------------
class MultimodalRQVAE(nn.Module):
    """One RQ-VAE per modality with MME-SID's loss (eq. 11).

    ``input_dims``: modality name -> feature size; ``anchor``: the modality aligned to all others
    (MME-SID: the collaborative one; text and image come pre-aligned from CLIP, so they are not
    aligned to each other). ``codebook_init``, ``sinkhorn_epsilons``, ``sinkhorn_iters``,
    ``rq_reduction`` and ``commitment_path`` go to every modality's ``ResidualQuantizer``.
    """

    def __init__(self, input_dims: Dict[str, int], hidden_dims: Sequence[int], latent_dim: int, n_levels: int,
                 codebook_size: int, anchor: Optional[str] = None, recon_loss: str = "mmd",
                 align_loss: str = "infonce", recon_weight: float = 1.0, align_weight: float = 1e-3,
                 rq_weight: float = 1.0, commitment_weight: float = 1.0, temperature: float = 0.1,
                 bandwidth_scale: float = 0.5, kmeans_iters: int = 20, codebook_init: str = "kmeans",
                 sinkhorn_epsilons: Optional[Sequence[float]] = None, sinkhorn_iters: int = 50,
                 rq_reduction: str = "sum", commitment_path: str = "every_level"):
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"rqvae_recon_loss={recon_loss!r}: choose one of {RECON_LOSSES}.")
        if align_loss not in ALIGN_LOSSES:
            raise ValueError(f"rqvae_align_loss={align_loss!r}: choose one of {ALIGN_LOSSES}.")
        if anchor is not None and anchor not in input_dims:
            raise ValueError(f"alignment anchor {anchor!r} is not one of the modalities {list(input_dims)}.")
        self.modalities = list(input_dims)
        self.anchor = anchor
        self.recon_loss, self.align_loss = recon_loss, align_loss
        self.recon_weight, self.align_weight, self.rq_weight = recon_weight, align_weight, rq_weight
        self.temperature, self.bandwidth_scale = temperature, bandwidth_scale
        quantizer_options = dict(codebook_init=codebook_init, sinkhorn_epsilons=sinkhorn_epsilons,
                                 sinkhorn_iters=sinkhorn_iters, loss_reduction=rq_reduction,
                                 commitment_path=commitment_path)
        self.rqvaes = nn.ModuleDict({
            name: RQVAE(dim, hidden_dims, latent_dim, n_levels, codebook_size, commitment_weight, kmeans_iters,
                        **quantizer_options)
            for name, dim in input_dims.items()
        })

    def reconstruction_loss(self, target, reconstruction):
        if self.recon_loss == "mse":
            return F.mse_loss(reconstruction, target)
        return gaussian_mmd2(target.detach(), reconstruction, bandwidth_scale=self.bandwidth_scale)

    def alignment_loss(self, anchor_quantized, other_quantized):
        if self.align_loss == "infonce":
            return info_nce(anchor_quantized, other_quantized, self.temperature)
        return gaussian_mmd2(anchor_quantized, other_quantized, bandwidth_scale=self.bandwidth_scale)

    def forward(self, features: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None):
        """features: name -> (B, D); present: name -> (B,) bool (rows without that modality are
        left out of its losses). Returns (total loss, dict of detached parts, per-modality outputs)."""
        outputs, recon, rq = {}, {}, {}
        for name in self.modalities:
            rows = present[name] if present is not None else torch.ones(len(features[name]), dtype=torch.bool,
                                                                         device=features[name].device)
            out = self.rqvaes[name](features[name][rows])
            outputs[name] = (rows, out)
            recon[name] = self.reconstruction_loss(features[name][rows], out["reconstruction"])
            rq[name] = out["rq_loss"].mean()
        align = {}
        if self.anchor is not None and self.align_loss != "none":
            anchor_rows, anchor_out = outputs[self.anchor]
            for name in self.modalities:
                if name == self.anchor:
                    continue
                rows, out = outputs[name]
                both = anchor_rows & rows
                if int(both.sum()) < 2:
                    continue
                anchor_q = self._rows_of(anchor_out["quantized"], anchor_rows, both)
                other_q = self._rows_of(out["quantized"], rows, both)
                align[name] = self.alignment_loss(anchor_q, other_q)
        total = self.recon_weight * sum(recon.values()) + self.rq_weight * sum(rq.values())
        if align:
            total = total + self.align_weight * sum(align.values())
        parts = {f"recon_{k}": v.item() for k, v in recon.items()}
        parts.update({f"rq_{k}": v.item() for k, v in rq.items()})
        parts.update({f"align_{self.anchor}_{k}": v.item() for k, v in align.items()})
        return total, parts, outputs

    @staticmethod
    def _rows_of(values, rows, wanted):
        """``values`` holds one row per True in ``rows``; keep the rows where ``wanted`` is True."""
        return values[wanted[rows]]

    @torch.no_grad()
    def encode(self, name: str, features, batch_size: int = 4096):
        """(semantic IDs (N, L), quantised ẑ (N, e), reconstruction ŝ (N, D)) in eval mode."""
        rqvae = self.rqvaes[name]
        was_training = rqvae.training
        rqvae.eval()
        codes, quantized, recon = [], [], []
        for start in range(0, len(features), batch_size):
            out = rqvae(features[start : start + batch_size])
            codes.append(out["codes"])
            quantized.append(out["quantized"])
            recon.append(out["reconstruction"])
        rqvae.train(was_training)
        return torch.cat(codes), torch.cat(quantized), torch.cat(recon)

    def codebooks(self) -> Dict[str, torch.Tensor]:
        return {name: rqvae.quantizer.codebooks.detach().clone() for name, rqvae in self.rqvaes.items()}

    @torch.no_grad()
    def reseed_dead_codes(self, features, present, generator=None, batch_size: int = 4096):
        """Every modality's ``ResidualQuantizer.reseed_dead_codes`` over the latents of all its items."""
        moved = {}
        for name, rqvae in self.rqvaes.items():
            rows = features[name][present[name]]
            z = torch.cat([rqvae.encoder(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)])
            moved[name] = rqvae.quantizer.reseed_dead_codes(z, generator)
        return moved


def train_multimodal_rqvae(model: MultimodalRQVAE, features: Dict[str, torch.Tensor],
                           present: Dict[str, torch.Tensor], epochs: int, batch_size: int,
                           learning_rate: float, weight_decay: float = 0.01, seed: int = 0, log=None,
                           reseed_dead_codes: bool = False):
    """Mini-batch training over items (Alg. 1 lines 3–9) with AdamW (``learning_rate``,
    ``weight_decay``; the authors' script: 2e-4, 1e-4). The first batch initialises the codebooks
    (drawing from the global RNG, which RecBole's ``init_seed`` fixes); ``seed`` draws the batch order
    and the re-seeding, so codebooks initialised beforehand make a run depend on ``seed`` alone.
    ``reseed_dead_codes``: after every epoch but the last, codes no item uses are moved onto items'
    residuals (``MultimodalRQVAE.reseed_dead_codes``; neither the paper nor the authors do this).
    Returns the per-epoch mean loss parts (with ``reseeded_<modality>``: codes moved, all levels)."""
    n_items = len(next(iter(features.values())))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n_items, generator=generator)
        sums, batches = Counter(), 0
        for start in range(0, n_items, batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:
                continue
            loss, parts, _ = model({k: v[rows] for k, v in features.items()}, {k: v[rows] for k, v in present.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sums.update(parts)
            sums["loss"] += loss.item()
            batches += 1
        history.append({k: v / batches for k, v in sums.items()})
        if reseed_dead_codes and epoch < epochs - 1:
            moved = model.reseed_dead_codes(features, present, generator)
            history[-1].update({f"reseeded_{name}": float(sum(counts)) for name, counts in moved.items()})
        if log is not None:
            log(f"MM-RQ-VAE epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in history[-1].items()))
    return history


# --------------------------------------------------------------------------------------------
# Tokenizer quality
# --------------------------------------------------------------------------------------------
def collision_statistics(codes) -> dict:
    """codes (N, L): items sharing all L codes with another item, distinct tuples, codebook usage."""
    tuples = Counter(map(tuple, codes.tolist()))
    colliding = sum(count for count in tuples.values() if count > 1)
    n_items = codes.shape[0]
    return {
        "items": n_items,
        "distinct_ids": len(tuples),
        "colliding_items": colliding,
        "collision_rate": colliding / max(n_items, 1),
        "max_items_per_id": max(tuples.values()) if tuples else 0,
        "codes_used_per_level": [int(codes[:, level].unique().numel()) for level in range(codes.shape[1])],
    }


def reconstruction_quality(features, reconstruction) -> dict:
    """Mean squared error, mean cosine and relative error ||s − ŝ|| / ||s|| of a decoder."""
    return {
        "mse": F.mse_loss(reconstruction, features).item(),
        "cosine": F.cosine_similarity(reconstruction, features, dim=-1).mean().item(),
        "relative_error": ((reconstruction - features).norm(dim=-1) / features.norm(dim=-1).clamp(min=1e-12)).mean().item(),
    }
