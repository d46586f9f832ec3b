"""Embedding diagnostics from MME-SID (Wang et al. CIKM'25), usable on any item-embedding matrix.

- Embedding collapse (Sec. 3.1, Fig. 3b): the singular-value spectrum of an embedding matrix,
  normalised by the largest value; written as CSV and PNG.
- Forgetting (Sec. 3.2, eq. 9): Kendall's τ between the behaviour–target distance orders of two
  embeddings of the same items: for every (history item h, target x) pair of every user, the
  Euclidean distance d(e_h, e_x) under embedding A and under embedding B; τ over all those pairs.

Command line:
    python -m recbole_mm.tools.embedding_analysis spectrum --out runs/spec A.pt:embedding B.pt:quantized.collab
    python -m recbole_mm.tools.embedding_analysis kendall --dataset Scientific A.pt:embedding B.pt:quantized.collab
A matrix is ``file[:key.subkey]``: a ``.npy``/``.pt`` matrix, or a key inside a ``.pt`` dict. Dicts
that carry ``item_tokens`` (what the MMESID stages write) are aligned to the dataset's item ids.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.atomic import open_atomic, save_figure_atomic


# --------------------------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------------------------
def singular_value_spectrum(matrix):
    """Singular values of ``matrix`` (rows = items), largest first, and the same divided by the largest."""
    values = torch.linalg.svdvals(torch.as_tensor(matrix, dtype=torch.float64))
    return values, values / values[0].clamp(min=1e-300)


def write_spectrum(matrices, out_prefix):
    """CSV (name, index, singular_value, normalised, log10_normalised) and a log-scale PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_prefix.with_suffix(".csv"), out_prefix.with_suffix(".png")
    figure, axes = plt.subplots(figsize=(6, 4))
    with open_atomic(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "index", "singular_value", "normalised", "log10_normalised"])
        for name, matrix in matrices.items():
            values, normalised = singular_value_spectrum(matrix)
            log_values = torch.log10(normalised.clamp(min=1e-300))
            for index, (value, norm, log_value) in enumerate(zip(values, normalised, log_values)):
                writer.writerow([name, index, f"{value.item():.8g}", f"{norm.item():.8g}", f"{log_value.item():.6f}"])
            axes.plot(range(1, len(values) + 1), log_values.numpy(), label=name)
    axes.set_xlabel("dimension index")
    axes.set_ylabel("log10 singular value / max")
    axes.legend(fontsize="small")
    figure.tight_layout()
    save_figure_atomic(figure, png_path, dpi=120)
    plt.close(figure)
    return csv_path, png_path


# --------------------------------------------------------------------------------------------
# Kendall's tau
# --------------------------------------------------------------------------------------------
def _tied_pairs(values):
    _, counts = np.unique(values, return_counts=True)
    return float((counts * (counts - 1) // 2).sum())


def kendall_tau(x, y):
    """τ of eq. 9: (concordant − discordant) / all pairs, a pair tied in x or y counting as neither
    (Kendall's τ-a). O(n log n) via SciPy's τ-b, whose numerator C − D is the same."""
    from scipy.stats import kendalltau

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n_pairs = len(x) * (len(x) - 1) / 2
    if n_pairs == 0:
        raise ValueError("Kendall's tau needs at least two values.")
    untied_x, untied_y = n_pairs - _tied_pairs(x), n_pairs - _tied_pairs(y)
    if untied_x == 0 or untied_y == 0:
        return 0.0
    tau_b = kendalltau(x, y, variant="b").statistic
    return float(tau_b * np.sqrt(untied_x * untied_y) / n_pairs)


def behaviour_target_distances(embedding, item_seq, item_seq_len, targets):
    """Euclidean d(e_h, e_x) for every real history item h of every row, in row-major order."""
    embedding = torch.as_tensor(embedding, dtype=torch.float64)
    mask = torch.arange(item_seq.shape[1])[None, :] < item_seq_len[:, None]
    differences = embedding[item_seq] - embedding[targets][:, None, :]
    return differences.norm(dim=-1)[mask]


def behaviour_target_kendall(embedding_a, embedding_b, item_seq, item_seq_len, targets):
    return kendall_tau(
        behaviour_target_distances(embedding_a, item_seq, item_seq_len, targets).numpy(),
        behaviour_target_distances(embedding_b, item_seq, item_seq_len, targets).numpy(),
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def load_item_matrix(spec, dataset=None):
    """``file[:key.subkey]`` -> (rows, D) float tensor; aligned to ``dataset``'s item ids when the
    file is a dict with ``item_tokens``. Any problem of the file is a ``RecboleMMError`` naming it."""
    path, _, key = str(spec).partition(":")
    if not Path(path).is_file():
        raise RecboleMMError(f"{path} does not exist; a matrix is given as file[:key.subkey] (a .npy or .pt file).")
    try:
        content = (torch.from_numpy(np.load(path, allow_pickle=False)) if path.endswith(".npy")
                   else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:
        raise RecboleMMError(f"{path}: cannot be read as a .npy array or a PyTorch tensor file "
                             f"({type(error).__name__}: {' '.join(str(error).split())[:200]}).") from None
    matrix = content
    for part in filter(None, key.split(".")):
        if not isinstance(matrix, dict) or part not in matrix:
            available = sorted(matrix) if isinstance(matrix, dict) else type(matrix).__name__
            raise RecboleMMError(f"{path}: no key {part!r} on the way to {key!r} (available: {available}).")
        matrix = matrix[part]
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise RecboleMMError(f"{spec} is not a 2-d tensor ({shape}); name a key holding one, e.g. {path}:embedding.")
    if not torch.isfinite(matrix.float()).all():
        raise RecboleMMError(f"{spec} holds NaN/inf values: neither a spectrum nor distances are defined for them.")
    if dataset is not None and isinstance(content, dict) and "item_tokens" in content:
        from recbole_mm.data.item_tables import rows_for_dataset_tokens

        matrix = matrix[rows_for_dataset_tokens(content["item_tokens"], dataset, path)]
    elif dataset is not None and matrix.shape[0] < dataset.item_num:
        raise RecboleMMError(f"{spec} has {matrix.shape[0]} rows, but dataset '{dataset.dataset_name}' has "
                             f"{dataset.item_num} item ids (0 = padding): give one row per internal item id, or a "
                             "dict with item_tokens (what the MMESID stages write).")
    return matrix.float()


def split_sequences(dataset_name, split="test", config_file_list=None, config_dict=None):
    """(dataset, item_seq, item_seq_len, targets) of one split, in RecBole internal ids."""
    from recbole.data import data_preparation

    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset

    config = Config(model="SASRec", dataset=dataset_name, config_file_list=config_file_list, config_dict=config_dict)
    dataset = create_dataset(config)
    loaders = dict(zip(("train", "valid", "test"), data_preparation(config, dataset)))
    interactions = loaders[split].dataset.inter_feat
    return (dataset, interactions[dataset.item_id_list_field], interactions[dataset.item_list_length_field],
            interactions[dataset.iid_field])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    spectrum = commands.add_parser("spectrum", help="singular-value spectrum of each matrix -> CSV + PNG")
    spectrum.add_argument("matrices", nargs="+")
    spectrum.add_argument("--out", required=True, help="output prefix (writes PREFIX.csv and PREFIX.png)")
    kendall = commands.add_parser("kendall", help="Kendall's tau of behaviour-target distances, A vs B")
    kendall.add_argument("a")
    kendall.add_argument("b")
    kendall.add_argument("--dataset", required=True)
    kendall.add_argument("--split", default="test", choices=["train", "valid", "test"])
    kendall.add_argument("--config_files", default=None)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except RecboleMMError as error:
        print(f"embedding_analysis: error: {error}", file=sys.stderr)
        return 2


def run_command(args):
    if args.command == "spectrum":
        matrices = {Path(spec).name: load_item_matrix(spec) for spec in args.matrices}  # short plot labels
        csv_path, png_path = write_spectrum(matrices, args.out)
        print(f"wrote {csv_path} and {png_path}")
    else:
        files = args.config_files.split() if args.config_files else None
        dataset, item_seq, item_seq_len, targets = split_sequences(args.dataset, args.split, files)
        tau = behaviour_target_kendall(load_item_matrix(args.a, dataset), load_item_matrix(args.b, dataset),
                                       item_seq, item_seq_len, targets)
        print(f"kendall_tau={tau:.4f} ({args.split} split of {args.dataset}: {args.a} vs {args.b})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
