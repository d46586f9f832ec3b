"""Where a training step's memory goes, and what splitting the batch into micro-batches saves.

    python benchmarks/bench_memory.py [--models MMM4Rec SASRec] [--widths default 64] [--micro_batches 1 2 4 8]
                                      [--steps 3] [--output FILE.md]

For every (model, width, micro-batch count k), in a fresh process with one torch thread, on the
Scientific copy of ``bench_profile.py`` (item lists cut to 20):

- the batch of the model's config (MMM4Rec: the authors' 1024 rows) is trained by the trainer's own
  ``_train_epoch`` with ``train_micro_batch_size: batch/k``: forward and backward in k pieces whose
  gradients add up (row-weighted) to the batch's, then one optimiser step (the same update;
  tests/test_trainer.py and tests/test_mmm4rec.py hold them equal). k = 1 is whole batches;
- floor: resident memory once the data and the model exist, before the first step;
- saved for backward: the bytes autograd keeps from one piece's forward for its backward
  (distinct storages, counted through ``torch.autograd.graph.saved_tensors_hooks``);
- peak: the highest resident memory from the first update on (a warm-up update, then ``--steps``
  timed ones; the kernel's VmHWM, reset after the build, so the data loading's own peak does not
  count), and peak minus floor: what training adds (activations, gradients, optimiser state);
- s / update: median CPU time of one batch's update (all k pieces and the optimiser step).

RecBole's built-in models (SASRec) train with RecBole's own trainer, which has no pieces: they get one row
per width, whole batches, as a reference. Writes a markdown table to ``--output`` (default benchmarks/results/memory_scientific.md) and prints it.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_profile import in_fresh_process, width_settings  # noqa: E402
from recbole_mm.utils.atomic import write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def resident_kib(field):
    """VmRSS / VmHWM of this process, in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_resident():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def saved_for_backward_bytes(net, batch):
    """Bytes of the distinct storages autograd saves during one forward of ``calculate_loss``."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = net.calculate_loss(batch)
    loss.backward()
    net.zero_grad(set_to_none=True)
    return sum(storages.values())


def measure_one(model, width, micro_batches, steps, queue):
    """Child process: build with batch/k rows per micro-batch and k accumulation steps, then measure."""
    try:
        import torch

        torch.set_num_threads(1)
        import logging

        from bench_mmm4rec import write_scientific_copy
        from recbole_mm.config import Config
        from recbole_mm.quick_start import build

        logging.disable(logging.INFO)
        os.chdir(tempfile.mkdtemp(prefix="bench_memory_"))
        data = write_scientific_copy(Path(tempfile.mkdtemp(prefix="scientific20_")), "Scientific20")
        config_dict = {**data, "show_progress": False, **width_settings(model, width, 0)}
        batch = Config(model, "Scientific20", config_dict=config_dict)["train_batch_size"]
        if batch % micro_batches:
            raise ValueError(f"batch {batch} is not divisible by {micro_batches} micro-batches")
        config_dict.update(train_micro_batch_size=batch // micro_batches if micro_batches > 1 else None)
        config, (train_data, _, _), net, trainer = build(model, "Scientific20", config_dict=config_dict)
        batches = [batch for _, batch in zip(range(steps + 1), train_data)]
        piece = batches[0][torch.arange(batch // micro_batches)]

        def update(rows):
            trainer._train_epoch([rows], 0)  # the trainer's own update: pieces, weights, optimiser step

        floor = resident_kib("VmRSS") * 1024
        reset_peak_resident()
        update(batches[0])  # warm-up (the optimiser state is made here)
        net.train()
        saved = saved_for_backward_bytes(net, piece)
        times = []
        for rows in batches[1:]:
            start = time.process_time()
            update(rows)
            times.append(time.process_time() - start)
        peak = resident_kib("VmHWM") * 1024
        queue.put({"model": model, "width": width, "hidden": config["hidden_size"], "batch": batch,
                   "micro_batches": micro_batches, "status": "ok", "floor": floor, "saved": saved, "peak": peak,
                   "step_s": sorted(times)[len(times) // 2]})
    except Exception as error:  # reported in the table; the other configurations still run
        queue.put({"model": model, "width": width, "micro_batches": micro_batches, "status": "failed",
                   "error": f"{type(error).__name__}: {error}"})


def markdown(rows, header):
    lines = [header, "",
             "| model | width | batch = pieces x rows | floor MiB | saved for backward MiB (one piece) | "
             "peak MiB | peak - floor MiB | s / update (CPU) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['width']} | k={row['micro_batches']} | failed: {row['error']} |")
            continue
        k = row["micro_batches"]
        lines.append(
            f"| {row['model']} | {row['width']} (d={row['hidden']}) | {row['batch']} = {k} x {row['batch'] // k} | "
            f"{row['floor'] / MIB:.0f} | {row['saved'] / MIB:.0f} | {row['peak'] / MIB:.0f} | "
            f"{(row['peak'] - row['floor']) / MIB:.0f} | {row['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["MMM4Rec", "SASRec"])
    parser.add_argument("--widths", nargs="+", default=["default", "64"])
    parser.add_argument("--micro_batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_scientific.md")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench_memory.py reads resident memory from /proc/self (Linux only).")

    import torch

    from recbole_mm.experiments.measure import machine_description

    torch.set_num_threads(1)  # as in every measuring child (the machine line says so)

    load_before = os.getloadavg()[0]
    from recbole_mm.utils import get_model

    rows = []
    for model in args.models:
        # RecBole's built-ins train with RecBole's own trainer (whole batches): a reference row each
        pieces = [1] if get_model(model).__module__.startswith("recbole.") else args.micro_batches
        for width in args.widths:
            for k in pieces:
                rows.append(in_fresh_process(measure_one, model, width, k, args.steps))
                print(rows[-1], flush=True)
    header = (f"# Training memory: activations and micro-batches (`train_micro_batch_size`)\n\n`python benchmarks/bench_memory.py --models "
              f"{' '.join(args.models)} --widths {' '.join(args.widths)} --micro_batches "
              f"{' '.join(map(str, args.micro_batches))} --steps {args.steps}`\n\n"
              f"Scientific train split (item lists cut to 20), each row in a fresh process, 1 torch thread; "
              f"median of {args.steps} updates after a warm-up update.\n"
              f"machine: {machine_description()} (load average {load_before:.1f} at start)")
    table = markdown(rows, header)
    write_text_atomic(args.output, table)
    print(table)


if __name__ == "__main__":
    main()
