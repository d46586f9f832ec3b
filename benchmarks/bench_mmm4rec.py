"""MMM4Rec on Scientific: training epoch time and accuracy next to SASRec and MMSASRec; transfer demo.

    python benchmarks/bench_mmm4rec.py timing   [--hidden_size 64] [--timing_steps 10]
    python benchmarks/bench_mmm4rec.py compare  [--hidden_size 64] [--epochs 30] [--models SASRec MMSASRec MMM4Rec]
    python benchmarks/bench_mmm4rec.py transfer [--hidden_size 64] [--epochs 30] [--pretrain_epochs 10]

timing: training-step time of the three models, interleaved step by step in one process, scaled to
one epoch.

compare: every model trains on the real Scientific benchmark ($RECBOLE_MM_DATA/Scientific; item lists
cut to their last 20 items, MMM4Rec's official max_len, in a temporary copy) with the same hidden size, batch size, learning rate and early stopping, one after the other in this process;
the table gives mean wall time of a training epoch, epochs to the best validation NDCG@10 and the
test metrics of the best-validation checkpoint.

transfer: Scientific's users are split into three disjoint parts by ``user index % 3`` (same items,
same frozen CLIP features, different people; written to a temporary folder, never into the repo).
Parts 0 and 1 are the pre-training sources (MMM4Rec, 2 layers, in-batch CE, both at once); part 2
is the target: a 1-layer MMM4Rec fine-tuned from that checkpoint vs the same model from scratch,
same settings and seed. Reported: epochs to best validation NDCG@10 and test NDCG@10 / Recall@10.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from recbole_mm.config import default_data_path
from recbole_mm.quick_start import build
from recbole_mm.quick_start.transfer import load_pretrained, pretrain
from recbole_mm.experiments.measure import machine_description  # noqa: E402
from recbole_mm.utils.atomic import copy_file_atomic, write_text_atomic  # noqa: E402


def shared_settings(args):
    return {
        "hidden_size": args.hidden_size, "inner_size": args.hidden_size * 2 if args.hidden_size < 128 else 256,
        "train_batch_size": args.batch_size, "eval_batch_size": 1024, "learning_rate": args.learning_rate,
        "epochs": args.epochs, "stopping_step": args.stopping_step, "show_progress": False, "seed": args.seed,
    }


def scientific_20(args):
    """Scientific with item lists cut to the last 20 (MMM4Rec's official max_len) for every model."""
    if not hasattr(args, "scientific"):
        args.scientific = write_scientific_copy(Path(tempfile.mkdtemp(prefix="scientific20_")), "Scientific20")
    return args.scientific


def model_settings(name, args):
    if name == "MMM4Rec":
        # heads = 2 * hidden / head_dim; the official 256-d config has 8 heads of 64 and d_state 64.
        head_dim = max(8, args.hidden_size // 4)
        return {"head_dim": head_dim, "n_groups": 2 * args.hidden_size // head_dim, "d_state": args.d_state}
    if name == "SASRec":
        return {"loss_type": "CE", "train_neg_sample_args": None}
    return {}


class TimeBudgetSpent(Exception):
    """Raised before a training epoch once ``--time_budget_s`` is used up (slow shared CPUs)."""


def train_and_test(model, dataset, config_dict, pretrained=None, time_budget_s=0):
    """Fit with early stopping, test the best checkpoint; return timings and metrics."""
    config, (train_data, valid_data, test_data), net, trainer = build(model, dataset, config_dict=config_dict)
    report = load_pretrained(net, pretrained) if pretrained else None
    epoch_times, valid_scores = [], []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train_epoch(*a, **k):
        if time_budget_s and time.perf_counter() - begin > time_budget_s:
            raise TimeBudgetSpent
        start = time.perf_counter()
        out = train_epoch(*a, **k)
        epoch_times.append(time.perf_counter() - start)
        return out

    def recorded_valid_epoch(*a, **k):
        score, result = valid_epoch(*a, **k)
        valid_scores.append(score)
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, recorded_valid_epoch
    begin, stopped_by_budget = time.perf_counter(), False
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    except TimeBudgetSpent:  # test the best checkpoint saved so far
        stopped_by_budget = True
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    best_epoch = max(range(len(valid_scores)), key=lambda i: valid_scores[i]) + 1 if valid_scores else 0
    return {
        "epoch_s": sum(epoch_times) / max(len(epoch_times), 1), "epochs_run": len(epoch_times),
        "best_epoch": best_epoch, "best_valid": max(valid_scores) if valid_scores else float("nan"),
        "ndcg10": test["ndcg@10"], "recall10": test["recall@10"],
        "params": sum(p.numel() for p in net.parameters()), "transfer": report,
        "stopped_by_budget": stopped_by_budget,
    }


def compare(args):
    rows = []
    for name in args.models:
        result = train_and_test(name, "Scientific20",
                                {**shared_settings(args), **model_settings(name, args), **scientific_20(args)},
                                time_budget_s=args.time_budget_s)
        rows.append((name, result))
        print(f"done {name}: {result}", flush=True)
    sasrec = dict(rows).get("SASRec")
    print(f"\nmachine: {machine_description()}")
    print(f"Scientific, hidden {args.hidden_size}, batch {args.batch_size}, lr {args.learning_rate}, <= {args.epochs} "
          f"epochs, early stop {args.stopping_step}, item lists cut to the last 20, seed {args.seed}")
    print("| model | params | s / train epoch | epochs run | best epoch | test NDCG@10 | test Recall@10 | NDCG@10 / SASRec |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        ratio = f"{r['ndcg10'] / sasrec['ndcg10']:.2f}x" if sasrec and sasrec["ndcg10"] else "-"
        stop = " (time budget)" if r["stopped_by_budget"] else ""
        print(f"| {name} | {r['params']:,} | {r['epoch_s']:.1f} | {r['epochs_run']}{stop} | {r['best_epoch']} | "
              f"{r['ndcg10']:.4f} | {r['recall10']:.4f} | {ratio} |")


def timing(args):
    """Training-step time of every model, measured round-robin in this process (drift in machine load
    hits all models alike), scaled to one epoch of Scientific."""
    clock = time.perf_counter
    if args.clock == "cpu":  # one thread, CPU time of this process: robust when the machine is overloaded
        torch.set_num_threads(1)
        clock = time.process_time
    runs = {}
    for name in args.models:
        config, (train_data, _, _), net, trainer = build(
            name, "Scientific20", config_dict={**shared_settings(args), **model_settings(name, args), **scientific_20(args)})
        runs[name] = (net, trainer.optimizer, list(train_data), len(train_data))
    step_times = {name: [] for name in runs}
    for step in range(args.timing_steps + 1):
        for name, (net, optimizer, batches, _) in runs.items():
            net.train()
            start = clock()
            optimizer.zero_grad()
            net.calculate_loss(batches[step % len(batches)]).backward()
            optimizer.step()
            if step:  # step 0 is warm-up
                step_times[name].append(clock() - start)
    print(f"\nmachine: {machine_description()}")
    print(f"Scientific train split (lists cut to the last 20), hidden {args.hidden_size}, batch {args.batch_size}, median of {args.timing_steps} "
          "training steps per model (forward+backward+NAdam/Adam step), models interleaved step by step, "
          f"clock: {'CPU time, 1 thread' if clock is time.process_time else 'wall time'}")
    print("| model | params | ms / step | s / epoch (steps x median) | vs SASRec |")
    print("|---|---|---|---|---|")
    medians = {name: sorted(times)[len(times) // 2] for name, times in step_times.items()}
    for name, (net, _, _, steps) in runs.items():
        ratio = f"{medians[name] / medians['SASRec']:.2f}x" if "SASRec" in medians else "-"
        print(f"| {name} | {sum(p.numel() for p in net.parameters()):,} | {1000 * medians[name]:.0f} | "
              f"{medians[name] * steps:.1f} | {ratio} |")


def write_scientific_copy(root, name, keep_user=lambda user: True, max_len=20):
    """A benchmark-format copy of Scientific under root/name: the users ``keep_user`` accepts, item lists
    cut to their last ``max_len`` items (RecBole's SASRec cannot take lists longer than
    MAX_ITEM_LIST_LENGTH, and RecBole would keep the *first* items), feature tables copied under
    one name ("Shared.feat*CLS") so one config serves every copy. Returns the dataset-config dict."""
    source = default_data_path() / "Scientific"
    target = root / name
    target.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        lines = (source / f"Scientific.{split}.inter").read_text().splitlines()
        kept = [lines[0]]
        for line in lines[1:]:
            user, items, item = line.split("\t")
            if keep_user(int(user)):
                kept.append("\t".join([user, " ".join(items.split(" ")[-max_len:]), item]))
        write_text_atomic(target / f"{name}.{split}.inter", "\n".join(kept) + "\n")
    copy_file_atomic(source / "Scientific.item2index", target / f"{name}.item2index")
    for suffix in ("feat1CLS", "feat3CLS"):
        copy_file_atomic(source / f"Scientific.{suffix}", target / f"Shared.{suffix}")
    return {
        "data_path": str(root), "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"], "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "TIME_FIELD": None, "MAX_ITEM_LIST_LENGTH": max_len, "modalities": ["text", "image"],
        "feature_tables": {"text": {"path": "Shared.feat1CLS", "dim": 512}, "image": {"path": "Shared.feat3CLS", "dim": 512}},
        "modalities": ["text", "image"],
    }


def transfer(args):
    root = Path(tempfile.mkdtemp(prefix="mmm4rec_transfer_"))
    names = [f"SciPart{part}" for part in range(3)]
    for part, name in enumerate(names):
        data = write_scientific_copy(root, name, keep_user=lambda user, part=part: user % 3 == part)
    common = {**shared_settings(args), **model_settings("MMM4Rec", args), **data, "num_layers": 1}
    start = time.perf_counter()
    pre_config = {**common, "epochs": args.pretrain_epochs,
                  "pretrain_config": {"num_layers": 2, "in_batch_loss": True, "learning_rate": args.pretrain_learning_rate}}
    checkpoint = pretrain("MMM4Rec", names[:2], config_dict=pre_config)
    pretrain_s = time.perf_counter() - start
    scratch = train_and_test("MMM4Rec", names[2], common, time_budget_s=args.time_budget_s)
    tuned = train_and_test("MMM4Rec", names[2], common, pretrained=checkpoint, time_budget_s=args.time_budget_s)
    print(f"\nmachine: {machine_description()}")
    print(f"target {names[2]} (users with index % 3 == 2); pre-training on {names[:2]} (users % 3 in {{0, 1}}): "
          f"{args.pretrain_epochs} epochs, 2 layers, in-batch CE, lr {args.pretrain_learning_rate}, {pretrain_s:.0f}s")
    print(f"fine-tune / scratch: 1 layer, hidden {args.hidden_size}, batch {args.batch_size}, lr {args.learning_rate}, "
          f"<= {args.epochs} epochs, early stop {args.stopping_step}, seed {args.seed}")
    print("| target run | epochs to best valid NDCG@10 | best valid NDCG@10 | test NDCG@10 | test Recall@10 | s / epoch |")
    print("|---|---|---|---|---|---|")
    for label, r in (("from scratch", scratch), ("fine-tuned from pre-training", tuned)):
        stop = " (time budget)" if r["stopped_by_budget"] else ""
        print(f"| {label} | {r['best_epoch']}{stop} | {r['best_valid']:.4f} | {r['ndcg10']:.4f} | {r['recall10']:.4f} | {r['epoch_s']:.1f} |")
    shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["timing", "compare", "transfer"])
    parser.add_argument("--models", nargs="+", default=["SASRec", "MMSASRec", "MMM4Rec"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--d_state", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--pretrain_epochs", type=int, default=10)
    parser.add_argument("--stopping_step", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--timing_steps", type=int, default=10)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="timing: wall time or 1-thread CPU time")
    parser.add_argument("--time_budget_s", type=float, default=0,
                        help="stop a training run before the next epoch once this many seconds are spent (0: off)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_mmm4rec_"))  # saved/ and log/ go here, not into the repo
    os.chdir(workdir)
    {"timing": timing, "compare": compare, "transfer": transfer}[args.part](args)


if __name__ == "__main__":
    main()
