"""MMSASRec vs RecBole's SASRec on Scientific, side by side in one run.

    python benchmarks/bench_mmsasrec.py [--hidden_size 64] [--epochs 200] [--stopping_step 10] [--seeds 2020]

Both train with the same data, split, seed, hidden size, full-softmax CE and early stopping on
valid NDCG@10, each in a fresh process (so peak RSS is its own). Prints seconds per training epoch,
its ratio to SASRec, peak resident memory, epochs run, and test Recall@10 / NDCG@10.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_mm.experiments.measure import machine_description, measured_run_in_fresh_process  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="Scientific")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--stopping_step", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--models", nargs="+", default=["SASRec", "MMSASRec"])
    args = parser.parse_args()

    shared = {
        "hidden_size": args.hidden_size, "inner_size": 4 * args.hidden_size, "epochs": args.epochs,
        "stopping_step": args.stopping_step, "seed": args.seed, "show_progress": False,
        "train_batch_size": 2048, "eval_batch_size": 4096, "learning_rate": 0.001,
    }
    rows = [{"model": model, **measured_run_in_fresh_process(model, args.dataset, config_dict=shared)}
            for model in args.models]
    base = next((row for row in rows if row["model"] == "SASRec" and row["status"] == "ok"), None)
    print(f"\n{args.dataset}, hidden_size={args.hidden_size}, machine: {machine_description()}\n")
    print("| model | params | s/epoch | x SASRec | peak RSS MiB | epochs | test Recall@10 | test NDCG@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["status"] != "ok":
            print(f"| {row['model']} | failed: {row['error']} |")
            continue
        ratio = row["seconds_per_epoch"] / base["seconds_per_epoch"] if base else float("nan")
        print(f"| {row['model']} | {row['parameters']:,} | {row['seconds_per_epoch']:.2f} | {ratio:.2f} | "
              f"{row['peak_rss_mib']:.0f} | {row['epochs']} | {row['test_result']['recall@10']:.4f} | "
              f"{row['test_result']['ndcg@10']:.4f} |")


if __name__ == "__main__":
    main()
