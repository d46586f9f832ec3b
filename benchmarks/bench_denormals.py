"""What flushing denormal floats to zero (``flush_denormal``) buys a trained model's training step on the CPU.

    python benchmarks/bench_denormals.py --checkpoint saved/<Model>-<time>-last.pth --model MMM4Rec --dataset Office
        [--config_files benchmarks/leaderboard/budget.yaml ...] [--steps 3] [--repeats 2] [--output FILE.md]

The checkpoint must come from a run with ``--flush_denormal=False`` (with flushing on, training never makes
denormals), trained long enough for them to appear; ``--model``, ``--dataset`` and ``--config_files`` must
be the ones it was trained with (its weights are loaded strictly). The table in
benchmarks/results/denormals.md came from epoch 21 of the Office MMM4Rec leaderboard cell, run as

    python -m recbole_mm.experiments.leaderboard --spec benchmarks/leaderboard/Office.yaml --models MMM4Rec \\
        --flush_denormal=False      # stopped after epoch 21: saved/leaderboard/Office/MMM4Rec-<time>-last.pth

For the freshly initialised model and for the checkpoint (weights and Adam state), each with flushing off
and on, in one process with one torch thread, after one unmeasured warm-up pass: the median CPU time of ``--steps`` full training steps
(forward, backward, optimiser step) on the same first batches, each configuration measured ``--repeats``
times in alternation so that a change of the machine's load hits all of them alike; the median over the
repeats is reported. Also counted: the denormal entries (0 < |x| < 1.18e-38) of the weights and of the
optimiser state. Prints a markdown table and writes it to ``--output`` (default
benchmarks/results/denormals.md).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recbole_mm.compat import load_checkpoint  # noqa: E402
from recbole_mm.experiments.measure import machine_description  # noqa: E402
from recbole_mm.quick_start.quick_start import build  # noqa: E402
from recbole_mm.utils.atomic import write_text_atomic  # noqa: E402

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def denormal_count(tensors):
    return sum(int(((t.abs() < SMALLEST_NORMAL) & (t != 0)).sum()) for t in tensors
               if torch.is_tensor(t) and t.is_floating_point())


def optimiser_tensors(optimizer_state):
    return [value for state in optimizer_state["state"].values() for value in state.values()]


def median_step_seconds(model, optimizer, state, batches, flush):
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    model.train()
    torch.set_flush_denormal(flush)
    try:
        seconds = []
        for batch in batches:
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            model.calculate_loss(batch).backward()
            optimizer.step()
            seconds.append(time.process_time() - start)
    finally:
        torch.set_flush_denormal(False)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint trained with --flush_denormal=False")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config_files", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "denormals.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    checkpoint = load_checkpoint(args.checkpoint)
    trained_config = checkpoint["config"]
    config_dict = {key: trained_config[key] for key in ("learning_rate", "seed") if key in trained_config}
    config, (train_data, _, _), model, trainer = build(
        args.model, args.dataset, args.config_files,
        {**config_dict, "show_progress": False, "state": "WARNING", "flush_denormal": False})
    batches = []
    for batch in train_data:
        batches.append(batch)
        if len(batches) == args.steps:
            break
    states = {
        "fresh": {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(trainer.optimizer.state_dict())},
        f"trained (epoch {checkpoint['epoch']})": {"model": checkpoint["state_dict"], "optimizer": checkpoint["optimizer"]},
    }
    median_step_seconds(model, trainer.optimizer, states["fresh"], batches, False)  # warm-up, not counted
    seconds = {(name, flush): [] for name in states for flush in (False, True)}
    for _ in range(args.repeats):
        for name, state in states.items():
            for flush in (False, True):
                seconds[name, flush].append(median_step_seconds(model, trainer.optimizer, state, batches, flush))
                print(f"{name}, flush_denormal={flush}: {seconds[name, flush][-1]:.2f} CPU s/step", flush=True)

    lines = [f"# Denormal floats and a training step: {args.model} on {args.dataset}", "",
             f"Machine: {machine_description()} (at the start). Command: `python benchmarks/bench_denormals.py "
             f"{' '.join(sys.argv[1:])}`.", f"Batch size {config['train_batch_size']}; median CPU time of "
             f"{args.steps} training steps (forward, backward, optimiser step), median over {args.repeats} "
             "alternating repeats.", "",
             "| model state | denormal weights | denormal optimiser entries | s/step, flush off | s/step, flush on "
             "| off / on |", "|---|---|---|---|---|---|"]
    for name, state in states.items():
        off, on = (statistics.median(seconds[name, flush]) for flush in (False, True))
        lines.append(f"| {name} | {denormal_count(state['model'].values()):,} | "
                     f"{denormal_count(optimiser_tensors(state['optimizer'])):,} | {off:.2f} | {on:.2f} | "
                     f"{off / on:.2f}x |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(args.output, table)
    print(table)


if __name__ == "__main__":
    main()
