"""FMRLRec sub-model tools: evaluate every nested size, extract standalone sub-models, count
parameters against independently trained models (paper section 6.2-6.3, Fig. 3-4).

    python -m recbole_mm.tools.fmrlrec evaluate --checkpoint saved/FMRLRec-X.pth [--split test] [--plot sizes.png]
    python -m recbole_mm.tools.fmrlrec extract  --checkpoint saved/FMRLRec-X.pth --size 64 --output saved/FMRLRec-64.pth
    python -m recbole_mm.tools.fmrlrec params   --checkpoint saved/FMRLRec-X.pth
    python -m recbole_mm.tools.fmrlrec family   --cells benchmarks/results/leaderboard/Scientific/reruns [--plot f.png]

Any further ``--key=value`` overrides the checkpoint's config (e.g. ``--data_path=...``).
An extracted checkpoint is an ordinary FMRLRec checkpoint (hidden_size = size) written by the
trainer's own checkpoint code, with its model settings in ``<output>.yaml``: ``evaluate`` runs it,
and so does the main CLI without training:
    python run_recbole_mm.py --model=FMRLRec --dataset=Scientific --config_files=FMRLRec-64.yaml \
        --resume=FMRLRec-64.pth --epochs=0
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed

from recbole_mm.compat import load_checkpoint, plain_config
from recbole_mm.config import PROPERTIES_DIR, Config
from recbole_mm.model.fmrlrec import FMRLRec, extract_submodel, resolve_mrl_sizes, submodel_config
from recbole_mm.model.layers.matryoshka import MatryoshkaLinear
from recbole_mm.data.utils import create_dataset
from recbole_mm.trainer.fmrlrec_trainer import evaluate_sizes
from recbole_mm.utils import RecboleMMError, get_trainer
from recbole_mm.utils.atomic import save_figure_atomic, write_text_atomic

# Keys RecBole derives from others while building a Config; passing them back in would fight it.
DERIVED_CONFIG_KEYS = {
    "device", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "single_spec", "local_rank",
    "train_neg_sample_args", "valid_neg_sample_args", "test_neg_sample_args",
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_table(model: FMRLRec, config, dataset, results: Sequence[Dict[str, float]]) -> str:
    """Markdown table: size, parameters of the extracted size-s model, every metric."""
    metric_names = list(results[0])
    lines = [
        "| size | params (extracted) | " + " | ".join(metric_names) + " |",
        "|---:|---:|" + "---:|" * len(metric_names),
    ]
    for size, result in zip(model.mrl_sizes, results):
        params = count_parameters(FMRLRec(submodel_config(config, size), dataset))
        lines.append(f"| {size} | {params:,} | " + " | ".join(f"{result[m]:.4f}" for m in metric_names) + " |")
    return "\n".join(lines)


def plot_sizes(sizes: Sequence[int], results: Sequence[Dict[str, float]], path: str, title: str) -> None:
    """Metric vs nested size (paper Fig. 3), one line per metric, log2 size axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for metric in results[0]:
        axis.plot(sizes, [r[metric] for r in results], marker="o", label=metric)
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(sizes), [str(s) for s in sizes])
    axis.set_xlabel("model size (hidden dims)")
    axis.set_ylabel("metric")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=120)
    plt.close(figure)


# ----- parameter accounting (paper Fig. 4) ------------------------------------------------------
def count_fmrl_layer_parameters(model: torch.nn.Module) -> int:
    """Parameters of the fMRL operators only (LRU B/C and FFN weights): the d x d / d x kd weights
    the paper's Section 4 analysis counts, without embeddings, feature projection and 1-D vectors."""
    return sum(
        p.numel() for module in model.modules() if isinstance(module, MatryoshkaLinear) for p in module.parameters()
    )


def parameter_accounting(config, dataset) -> List[Dict[str, int]]:
    """Per size s: parameters of the extracted size-s model, of an independent (plain, dense)
    size-s model, and of the family {sizes <= s} trained separately; ``*_fmrl_layers``: the same
    counts restricted to the fMRL operators."""
    sizes = resolve_mrl_sizes(config["mrl_sizes"], int(config["hidden_size"]))
    rows, family, family_layers = [], 0, 0
    for size in sizes:
        independent_config = submodel_config(config, size)
        independent_config["mrl_sizes"] = [size]
        independent = FMRLRec(independent_config, dataset)
        extracted = FMRLRec(submodel_config(config, size), dataset)
        family += count_parameters(independent)
        family_layers += count_fmrl_layer_parameters(independent)
        rows.append({
            "size": size,
            "extracted": count_parameters(extracted),
            "independent": count_parameters(independent),
            "independent_family": family,
            "extracted_fmrl_layers": count_fmrl_layer_parameters(extracted),
            "independent_fmrl_layers": count_fmrl_layer_parameters(independent),
            "independent_family_fmrl_layers": family_layers,
        })
    return rows


def parameter_table(rows: Sequence[Dict[str, int]]) -> str:
    """Paper Fig. 4: R_s = (independent family - fMRL) / fMRL, with our chunked storage, with the
    paper's masked dense storage (whose tensors have an independent model's shapes), and the latter
    restricted to the fMRL weights (the paper's Section 4 count, which tends to 1/3)."""
    lines = [
        "| size s | extracted fMRL model | independent model | independent family (sizes <= s) "
        "| R_s, chunked fMRL | R_s, masked dense fMRL | R_s, masked dense, fMRL weights only |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        family = row["independent_family"]
        chunked = (family - row["extracted"]) / row["extracted"]
        masked_dense = (family - row["independent"]) / row["independent"]
        layers_only = (row["independent_family_fmrl_layers"] - row["independent_fmrl_layers"]) / row["independent_fmrl_layers"]
        lines.append(
            f"| {row['size']} | {row['extracted']:,} | {row['independent']:,} | {family:,} "
            f"| {chunked:.1%} | {masked_dense:.1%} | {layers_only:.1%} |"
        )
    return "\n".join(lines)


# ----- checkpoints ---------------------------------------------------------------------------
def config_from_checkpoint(saved: dict, cmd_args: Sequence[str] = ()):
    """Rebuild the run's Config: defaults of the saved model/dataset plus every saved value that
    differs from them (the run's own settings), then the ``--key=value`` strings ``cmd_args``."""
    model, dataset = saved.get("model"), saved.get("dataset")
    if model != "FMRLRec":
        raise RecboleMMError(f"fmrlrec_tools: the checkpoint was written by model '{model}', not FMRLRec.")
    defaults = plain_config(Config(model=model, dataset=dataset, cmd_args=cmd_args))
    run_settings = {
        key: value for key, value in saved.items()
        if key not in DERIVED_CONFIG_KEYS and defaults.get(key) != value
    }
    if "data_path" in run_settings:  # stored joined with the dataset name, which Config appends again
        stored = Path(run_settings["data_path"])
        run_settings["data_path"] = str(stored.parent if stored.name == dataset else stored)
    return Config(model=model, dataset=dataset, config_dict=run_settings, cmd_args=cmd_args)


def load_run(checkpoint_path: str, cmd_args: Sequence[str] = ()):
    """(config, (train, valid, test) loaders, model with the checkpoint's weights, checkpoint)."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = config_from_checkpoint(checkpoint.get("config", {}), cmd_args)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    model = FMRLRec(config, loaders[0].dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    return config, loaders, model, checkpoint


def save_submodel(checkpoint_path: str, size: int, output_path: str, cmd_args: Sequence[str] = ()) -> FMRLRec:
    """Write the standalone size-``size`` model of a trained FMRLRec as a regular checkpoint, and
    beside it ``<output>.yaml`` with its model settings (for ``run_recbole_mm.py --config_files``)."""
    config, (train_data, _, _), model, checkpoint = load_run(checkpoint_path, cmd_args)
    small = extract_submodel(model, config, train_data.dataset, size)
    small_config = submodel_config(config, size)
    trainer = get_trainer(small_config["MODEL_TYPE"], "FMRLRec")(small_config, small)
    trainer.cur_step = checkpoint.get("cur_step", 0)
    trainer.best_valid_score = checkpoint.get("best_valid_score", trainer.best_valid_score)
    trainer._save_checkpoint(checkpoint.get("epoch", 0), saved_model_file=output_path, verbose=False)
    # the model's own keys, plus the modalities (a dataset-level default the run may have overridden)
    model_keys = ["modalities", *yaml.safe_load((PROPERTIES_DIR / "model" / "FMRLRec.yaml").read_text())]
    settings = {key: plain_config(small_config)[key] for key in dict.fromkeys(model_keys)}
    write_text_atomic(Path(output_path).with_suffix(".yaml"), yaml.safe_dump(settings, sort_keys=False))
    return small


def family_retention(records: Sequence[dict], metric: str = "ndcg@10") -> Dict[int, List[float]]:
    """Per nested size, each run's test ``metric`` as a fraction of its own largest size (paper Fig. 3's
    question: how much of the full model does a size keep), from leaderboard cells that hold
    ``test_result_per_size`` (FMRLRec runs report every size)."""
    retention: Dict[int, List[float]] = {}
    for record in records:
        per_size = {int(size): result[metric] for size, result in record["test_result_per_size"].items()}
        full = per_size[max(per_size)]
        for size, value in per_size.items():
            retention.setdefault(size, []).append(value / full)
    return dict(sorted(retention.items()))


def family_table(records: Sequence[dict], metric: str = "ndcg@10") -> str:
    """Markdown: one column per run (seed), each size's metric and its share of the run's largest size."""
    records = sorted(records, key=lambda record: record["seed"])
    retention = family_retention(records, metric)
    lines = ["| size | " + " | ".join(f"seed {r['seed']} {metric}" for r in records) + " | kept of the largest size |",
             "|---:|" + "---:|" * (len(records) + 1)]
    for size, shares in retention.items():
        values = [r["test_result_per_size"][str(size)][metric] for r in records]
        spread = f" ± {statistics.stdev(shares):.1%}" if len(shares) > 1 else ""
        lines.append(f"| {size} | " + " | ".join(f"{v:.4f} ({share:.1%})" for v, share in zip(values, shares))
                     + f" | {statistics.mean(shares):.1%}{spread} |")
    return "\n".join(lines)


def read_family_cells(paths: Sequence[str]) -> List[dict]:
    """FMRLRec cell records (JSON) from files or folders; cells without per-size results are refused by name."""
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("FMRLRec_*.json")) if p.is_dir() else [p])]
    if not files:
        raise RecboleMMError(f"no FMRLRec_*.json cell in {', '.join(paths)}.")
    records = []
    for file in files:
        record = json.loads(file.read_text(encoding="utf-8"))
        if not record.get("test_result_per_size"):
            raise RecboleMMError(f"{file}: no 'test_result_per_size' (the cell was trained before FMRLRec runs "
                                 "reported every size); train it again, e.g. into another leaderboard --output.")
        records.append(record)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="metrics of every nested size (table + optional PNG plot)")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--split", choices=["valid", "test"], default="test")
    evaluate.add_argument("--plot", default=None, help="PNG path for metric vs size")
    extract = commands.add_parser("extract", help="write a standalone size-s checkpoint")
    extract.add_argument("--checkpoint", required=True)
    extract.add_argument("--size", type=int, required=True)
    extract.add_argument("--output", required=True)
    params = commands.add_parser("params", help="parameter accounting vs independent models")
    params.add_argument("--checkpoint", required=True)
    family = commands.add_parser("family", help="every size's share of the full size over stored runs (seeds)")
    family.add_argument("--cells", nargs="+", required=True, help="leaderboard cell files or folders")
    family.add_argument("--metric", default="ndcg@10")
    family.add_argument("--plot", default=None, help="PNG path for the mean metric vs size")
    args, cmd_args = parser.parse_known_args(argv)  # the rest: --key=value config overrides
    try:
        if args.command == "family":
            records = read_family_cells(args.cells)
            print(family_table(records, args.metric))
            if args.plot:
                sizes = sorted(int(size) for size in records[0]["test_result_per_size"])
                means = [{args.metric: statistics.mean(r["test_result_per_size"][str(size)][args.metric]
                                                       for r in records)} for size in sizes]
                plot_sizes(sizes, means, args.plot, f"FMRLRec on {records[0]['dataset']} (test, mean of "
                                                    f"{len(records)} seeds)")
                print(f"plot: {args.plot}")
            return 0
        if args.command == "extract":
            small = save_submodel(args.checkpoint, args.size, args.output, cmd_args)
            print(f"wrote {args.output}: FMRLRec hidden_size={args.size}, mrl_sizes={small.mrl_sizes}, "
                  f"{count_parameters(small):,} parameters")
            return 0
        config, (train_data, valid_data, test_data), model, _ = load_run(args.checkpoint, cmd_args)
        if args.command == "params":
            print(parameter_table(parameter_accounting(config, train_data.dataset)))
            return 0
        results = evaluate_sizes(model, test_data if args.split == "test" else valid_data, config)
        print(size_table(model, config, train_data.dataset, results))
        if args.plot:
            plot_sizes(model.mrl_sizes, results, args.plot, f"FMRLRec on {config['dataset']} ({args.split})")
            print(f"plot: {args.plot}")
        return 0
    except (RecboleMMError, FileNotFoundError, ValueError) as error:
        print(f"fmrlrec_tools: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
