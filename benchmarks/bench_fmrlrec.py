"""FMRLRec benchmarks on Scientific: training cost of all nested sizes at once, incremental
(recurrent) inference, and accuracy next to SASRec and MMSASRec.

    python benchmarks/bench_fmrlrec.py train-time [--hidden 256] [--batches 4] [--rounds 3] [--full_epoch]
    python benchmarks/bench_fmrlrec.py inference [--lengths 50 200] [--batch_sizes 1 256]
    python benchmarks/bench_fmrlrec.py accuracy [--hidden 256] [--epochs 20] [--models SASRec MMSASRec FMRLRec] [--out DIR]

train-time: one training step (forward, backward, AdamW step) on the same Scientific batches for
FMRLRec (every size of mrl_sizes), the same network with a single size (plain LRURec-style model,
no MRL), RecBole's SASRec of the same width, and plain models of each smaller size (their sum is
the cost of training the family separately). Models take turns batch by batch, so a busy machine
slows all of them alike; the median step time times the number of batches per epoch gives the
epoch time (``--full_epoch`` times whole epochs instead).
inference: scoring every item after appending one interaction, recurrent step (carried LRU
states) vs re-encoding the whole history with the parallel scan.
accuracy: trains the three models with the same data/batch/epoch settings through
``recbole_mm.quick_start.run``, prints test metrics, FMRLRec's per-size table and parameter
accounting, and saves the metric-vs-size plot.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from recbole.data import data_preparation
from recbole.model.sequential_recommender import SASRec

from recbole_mm.config import Config
from recbole_mm.tools.fmrlrec import (
    evaluate_sizes,
    load_run,
    parameter_accounting,
    parameter_table,
    plot_sizes,
    size_table,
)
from recbole_mm.model.fmrlrec import FMRLRec, resolve_mrl_sizes
from recbole_mm.data import create_dataset
from recbole_mm.experiments.measure import machine_description  # noqa: E402
from recbole_mm.utils.atomic import write_text_atomic  # noqa: E402


def scientific(config_dict):
    config = Config(model="FMRLRec", dataset="Scientific", config_dict={"state": "ERROR", **config_dict})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return config, train_data


def single_size_config(config, hidden_size):
    """The same network at one size, without MRL (a single chunk is a dense layer)."""
    return Config(model="FMRLRec", dataset="Scientific", config_dict={
        "state": "ERROR", "train_batch_size": config["train_batch_size"],
        "hidden_size": hidden_size, "mrl_sizes": [hidden_size],
    })


# ----- training time ------------------------------------------------------------------------
def train_time(args):
    device = torch.device(args.device)
    config, train_data = scientific({"hidden_size": args.hidden, "train_batch_size": args.batch_size})
    dataset = train_data.dataset
    sizes = resolve_mrl_sizes(config["mrl_sizes"], args.hidden)
    models = {f"FMRLRec d={args.hidden}, sizes {sizes}": FMRLRec(config, dataset)}
    models[f"LRU d={args.hidden}, no MRL"] = FMRLRec(single_size_config(config, args.hidden), dataset)
    sasrec_config = Config(model="SASRec", dataset="Scientific", config_dict={
        "state": "ERROR", "hidden_size": args.hidden, "inner_size": args.hidden,
        "train_batch_size": args.batch_size,
    })
    models[f"SASRec d={args.hidden} (RecBole)"] = SASRec(sasrec_config, dataset)
    for size in sizes[:-1]:
        models[f"LRU d={size}, no MRL"] = FMRLRec(single_size_config(config, size), dataset)
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def train_step(name, interaction):
        start = time.perf_counter()
        loss = models[name].calculate_loss(interaction.to(device))
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step_times = {name: [] for name in models}
    if args.full_epoch:
        for _ in range(args.rounds):
            for name in models:
                step_times[name].append(sum(train_step(name, batch) for batch in train_data))
        epoch_times = {name: statistics.median(times) for name, times in step_times.items()}
    else:
        batches = []
        for batch in train_data:
            batches.append(batch)
            if len(batches) == args.batches:
                break
        for name in models:
            train_step(name, batches[0])  # warm-up
        for _ in range(args.rounds):
            for batch in batches:
                for name in models:
                    step_times[name].append(train_step(name, batch))
        epoch_times = {name: statistics.median(times) * len(train_data) for name, times in step_times.items()}

    names = list(models)
    fmrl, plain, sasrec = (epoch_times[n] for n in names[:3])
    separate = sum(epoch_times[n] for n in names if n.startswith("LRU"))
    print(f"\nTraining time per epoch on Scientific ({len(train_data.dataset)} training sequences, "
          f"batch {args.batch_size}, {len(train_data)} batches); {machine_description()}")
    print("measured " + ("over whole epochs" if args.full_epoch else
                         f"as median step time x batches ({args.batches} batches x {args.rounds} rounds, models interleaved)"))
    print("\n| model | parameters | s / epoch | vs LRU d=%d no MRL |" % args.hidden)
    print("|---|---:|---:|---:|")
    for name in names:
        n_params = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {n_params:,} | {epoch_times[name]:.1f} | {epoch_times[name] / plain:.2f}x |")
    print(f"| every size trained separately (sum of the LRU rows) | | {separate:.1f} | {separate / plain:.2f}x |")
    print(f"\nMRL overhead (FMRLRec / plain LRU): {fmrl / plain:.2f}x; FMRLRec / separate family: "
          f"{fmrl / separate:.2f}x; FMRLRec / SASRec: {fmrl / sasrec:.2f}x")


# ----- incremental inference --------------------------------------------------------------------
@torch.no_grad()
def inference(args):
    device = torch.device(args.device)
    config, train_data = scientific({"hidden_size": args.hidden})
    model = FMRLRec(config, train_data.dataset).to(device).eval()
    table = model.item_table()
    n_items = table.shape[0]
    print(f"\nIncremental next-item scoring, FMRLRec d={args.hidden}, n_layers={config['n_layers']}, "
          f"{n_items} items; {machine_description()}")
    print("time per appended interaction (median of %d); 'score' includes scoring all items" % args.repeats)
    print("\n| L | batch | re-encode (ms) | step (ms) | speed-up | re-encode + score (ms) | step + score (ms) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    for length in args.lengths:
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(length)
            items = torch.randint(1, n_items, (batch, length + 1), generator=gen).to(device)
            full_len = torch.full((batch,), length + 1, device=device)
            _, states = model.encode_history(items[:, :length], full_len - 1, table)

            def reencode():
                return model.forward(items, full_len, table)

            def step():
                return model.step(items[:, length], states, table)[0]

            diff = (reencode() - step()).abs().max().item()
            t_re, t_step = timed(reencode), timed(step)
            t_re_s = timed(lambda: reencode() @ table.T)
            t_step_s = timed(lambda: step() @ table.T)
            print(f"| {length} | {batch} | {t_re:.2f} | {t_step:.2f} | {t_re / t_step:.1f}x | {t_re_s:.2f} | "
                  f"{t_step_s:.2f} | {t_re_s / t_step_s:.1f}x | {diff:.1e} |")


# ----- accuracy ---------------------------------------------------------------------------------
def accuracy(args):
    """Trains ``--models`` (each result kept in ``<out>/accuracy_<model>.json``, so the models can
    run in separate processes), then reports every model found in ``--out``."""
    from recbole_mm.quick_start import run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "epochs": args.epochs, "stopping_step": args.stopping_step, "train_batch_size": args.batch_size,
        "eval_batch_size": 4096, "show_progress": False, "checkpoint_dir": str(out / "saved"), "seed": args.seed,
    }
    model_settings = {"SASRec": {}, "MMSASRec": {}, "FMRLRec": {"hidden_size": args.hidden}}
    for model in args.models:
        start = time.perf_counter()
        result = run(model, "Scientific", config_dict={**common, **model_settings[model]})
        result["train_minutes"] = (time.perf_counter() - start) / 60
        result["machine"] = machine_description()
        write_text_atomic(out / f"accuracy_{model}.json", json.dumps(result, indent=1, default=str))

    results = {model: json.loads((out / f"accuracy_{model}.json").read_text())
               for model in model_settings if (out / f"accuracy_{model}.json").is_file()}
    lines = [f"Scientific test set (full ranking); epochs <= {args.epochs}, early stopping on valid NDCG@10 "
             f"(patience {args.stopping_step}), batch {args.batch_size}, seed {args.seed}",
             "", "| model | parameters | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | minutes | machine |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for model, result in results.items():
        test = result["test_result"]
        lines.append(f"| {model} | {result['parameters']:,} | {test['recall@10']:.4f} | {test['ndcg@10']:.4f} | "
                     f"{test['recall@20']:.4f} | {test['ndcg@20']:.4f} | {result['train_minutes']:.1f} | {result['machine']} |")
    if "FMRLRec" in results:
        config, (train_data, _, test_data), model, _ = load_run(results["FMRLRec"]["checkpoint"])
        per_size = evaluate_sizes(model, test_data, config)
        plot_path = out / "fmrlrec_sizes_scientific.png"
        plot_sizes(model.mrl_sizes, [{k: r[k] for k in ("recall@10", "ndcg@10")} for r in per_size],
                   str(plot_path), "FMRLRec sub-models, Scientific test")
        full_ndcg = per_size[-1]["ndcg@10"]
        lines += ["", "FMRLRec: every nested size of the one trained model (extracted sub-models), test set:", "",
                  size_table(model, config, train_data.dataset, per_size), "",
                  "NDCG@10 kept vs full size: " + ", ".join(
                      f"{s}: {r['ndcg@10'] / full_ndcg:.0%}" for s, r in zip(model.mrl_sizes, per_size)),
                  "", f"plot: {plot_path}", "", "Parameter accounting (paper Fig. 4):", "",
                  parameter_table(parameter_accounting(config, train_data.dataset))]
    report = "\n".join(lines)
    write_text_atomic(out / "fmrlrec_accuracy_scientific.md", report + "\n")
    print(report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["train-time", "inference", "accuracy"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full_epoch", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--stopping_step", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", nargs="*", default=["SASRec", "MMSASRec", "FMRLRec"],
                        help="accuracy: models to train now (none: only report what --out holds)")
    args = parser.parse_args(argv)
    {"train-time": train_time, "inference": inference, "accuracy": accuracy}[args.section](args)


if __name__ == "__main__":
    sys.exit(main())
