"""Training-step profile of each model on Scientific, against the machine's own GEMM speed.

    python benchmarks/bench_profile.py [--quick] [--models SASRec MMSASRec FMRLRec MMM4Rec MMESID Speeder]
                                       [--widths default 64] [--steps 3] [--output FILE.md]

For every (model, width) pair, in a fresh process (so peak RSS is that configuration's own), with one
torch thread:

- step time: median CPU time of ``--steps`` training steps (forward, backward, optimiser step) after one
  warm-up step. CPU time of one thread, not wall time: the number holds on a loaded, shared machine;
- FLOPs of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
  attention: the arithmetic a roofline counts; elementwise work is not counted);
- achieved GFLOP/s = FLOPs / step time, and the same process's plain fp32 GEMM GFLOP/s (a
  (20480 x 256) @ (256 x 1024) matmul, the shape of a projection over a 1024 x 20 batch), measured
  right before the steps; their ratio is the fraction of the GEMM roofline the step reaches;
- the same steps again under autograd's anomaly mode, which RecBole 1.2.1 switches on for every model
  at import (sine.py) and recbole_mm.compat switches off: what that switch buys;
- peak resident memory of the process; the five operators with the most self CPU time in one
  profiled step (torch.profiler).

"default" is the model's own yaml (MMM4Rec: the authors' d=256, batch 1024); "64" sets hidden size 64
with the settings of ``bench_mmm4rec.py`` (inner size 128, batch 1024; MMM4Rec head_dim 16, 8 groups,
d_state 32). Item lists are cut to their last 20 items for every model (MMM4Rec's max_len).

MMESID and Speeder are 64 wide by default, so they have a "default" row only. MMESID's row is its LLM
stage (stage 3) on synthetic stage-1/2 files of the default shapes (random collaborative table, codes and
codebooks: a step costs the same whatever their values). Speeder has one row per MPO stage (the parameters
that stage trains; its ID table comes from a one-epoch SASRec, again only its values differ).
``--quick``: SASRec and MMM4Rec only, 2 measured steps. Writes a markdown table to ``--output``
(default benchmarks/results/profile_scientific.md) and prints it.
"""
import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recbole_mm.utils.atomic import torch_save_atomic, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GEMM_SHAPE = (20480, 256, 1024)


def gemm_gflops(clock, repeats=3):
    """Best-of-``repeats`` fp32 GFLOP/s of one plain matmul of GEMM_SHAPE on this thread."""
    import torch

    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * m * k * n / best / 1e9


def width_settings(model, width, batch_size):
    from bench_mmm4rec import model_settings

    if width == "default":
        settings = {"SASRec": {"loss_type": "CE", "train_neg_sample_args": None}}.get(model, {})
        return {**settings, **({"train_batch_size": batch_size} if batch_size else {})}
    width = int(width)
    args = argparse.Namespace(hidden_size=width, d_state=32)
    return {"hidden_size": width, "inner_size": 2 * width if width < 128 else 256,
            "train_batch_size": batch_size or 1024, **model_settings(model, args)}


WIDE_BY_DEFAULT = ("MMESID", "Speeder")  # their "default" rows are already 64 wide


def synthetic_mmesid_stage_files(config_dict, root):
    """Stage-1/2 files of MMESID's default shapes over every item of the copy (values random)."""
    import torch
    from recbole_mm.config import Config

    config = Config("MMESID", "Scientific20", config_dict=config_dict)
    tokens = set()
    for split in ("train", "valid", "test"):
        lines = (Path(config_dict["data_path"]) / "Scientific20" / f"Scientific20.{split}.inter").read_text().splitlines()
        for line in lines[1:]:
            _, items, item = line.split("\t")
            tokens.update(items.split(" ") + [item])
    tokens = sorted(tokens, key=int)
    levels, codes = config["rqvae_levels"], config["rqvae_codebook_size"]
    latent = config["rqvae_latent_dim"] or config["llm_hidden_size"]
    channels = ["collab", *config["modalities"]]
    collab, sid = root / "collab.pt", root / "sid.pt"
    torch_save_atomic({"item_tokens": tokens,
                       "embedding": torch.randn(len(tokens), config["collab_config"]["hidden_size"])}, collab)
    torch_save_atomic({"item_tokens": tokens,
                       "codes": {name: torch.randint(0, codes, (len(tokens), levels)) for name in channels},
                       "codebooks": {name: torch.randn(levels, codes, latent) for name in channels}}, sid)
    return {"mmesid_collab_file": str(collab), "mmesid_sid_file": str(sid)}


def model_settings_for_profile(model, config_dict, root):
    if model == "MMESID":
        return synthetic_mmesid_stage_files(config_dict, root)
    if model == "Speeder":
        from recbole_mm.config import Config

        id_sasrec = Config("Speeder", "Scientific20", config_dict=config_dict)["id_sasrec"]
        return {"id_sasrec": {**id_sasrec, "epochs": 1}}
    return {}


def profile_one(model, width, steps, batch_size, queue):
    """Child process: build, time, count and profile one configuration; put a list of result dicts on
    ``queue`` (one per training stage: Speeder has three)."""
    try:
        import torch

        torch.set_num_threads(1)
        import logging

        from bench_mmm4rec import write_scientific_copy
        from recbole_mm.quick_start import build

        logging.disable(logging.INFO)
        os.chdir(tempfile.mkdtemp(prefix="bench_profile_"))
        data = write_scientific_copy(Path(tempfile.mkdtemp(prefix="scientific20_")), "Scientific20")
        config_dict = {**data, "show_progress": False, **width_settings(model, width, batch_size)}
        config_dict.update(model_settings_for_profile(model, config_dict, Path(os.getcwd())))
        config, (train_data, _, _), net, trainer = build(model, "Scientific20", config_dict=config_dict)
        batches = [batch for _, batch in zip(range(steps + 3), train_data)]
        net.train()
        stages = net.training_stages() if hasattr(net, "training_stages") else [None]
        results = []
        for stage in stages:
            if stage is not None:
                net.enter_stage(stage)
            results.append({"model": model if stage is None else f"{model} stage {stage.name}", "width": width,
                            **time_steps(net, trainer, batches, steps)})
            results[-1].update({"hidden": config["hidden_size"] or config["llm_hidden_size"], "batch": config["train_batch_size"],
                                "pieces": config["train_micro_batch_size"],
                                "params": sum(p.numel() for p in net.parameters() if p.requires_grad),
                                "steps_per_epoch": len(train_data)})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put([{**result, "peak_rss_mib": peak} for result in results])
    except Exception as error:  # reported in the table, the other configurations still run
        queue.put([{"model": model, "width": width, "status": "failed", "error": f"{type(error).__name__}: {error}"}])


def time_steps(net, trainer, batches, steps):
    """Step time, counted FLOPs, GEMM speed and top operators of ``net``'s training step on ``batches``: the
    trainer's own update of one batch (in pieces of ``train_micro_batch_size`` rows where the config sets it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    def step(batch):
        trainer._train_epoch([batch], 0)

    clock = time.process_time
    step(batches[0])  # warm-up
    gemm = gemm_gflops(clock)

    def median_step_time():
        times = []
        for index in range(steps):
            start = clock()
            step(batches[(1 + index) % len(batches)])
            times.append(clock() - start)
        return sorted(times)[len(times) // 2]

    step_s = median_step_time()
    with torch.autograd.detect_anomaly(check_nan=True):  # what RecBole alone leaves on (recbole_mm.compat)
        anomaly_step_s = median_step_time()
    with FlopCounterMode(display=False) as counter:
        step(batches[1 % len(batches)])
    flops = counter.get_total_flops()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[1 % len(batches)])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [f"{e.key.replace('aten::', '')} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:5]]
    return {"status": "ok", "step_s": step_s, "anomaly_step_s": anomaly_step_s, "gflop": flops / 1e9,
            "achieved": flops / step_s / 1e9, "gemm": gemm, "top": top}


def in_fresh_process(target, *args):
    """What ``target(*args, queue)`` puts on its queue, run in a spawned process (peak RSS is its own)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def markdown(rows, header):
    lines = [header, "",
             "| model | width | batch | trainable params | s / step (CPU) | s / epoch | GFLOP / step | achieved GFLOP/s | "
             "GEMM GFLOP/s | roofline ratio | x SASRec (same width) | s / step, anomaly mode on | peak RSS MiB | "
             "top-5 operators (self CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    sasrec = {row["width"]: row for row in rows if row["model"] == "SASRec" and row["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['width']} | failed: {row['error']} |")
            continue
        base = sasrec.get(row["width"])
        ratio = f"{row['step_s'] / base['step_s']:.2f}" if base else "-"
        pieces = f" (pieces of {row['pieces']})" if row.get("pieces") else ""
        lines.append(
            f"| {row['model']} | {row['width']} (d={row['hidden']}) | {row['batch']}{pieces} | {row['params']:,} | "
            f"{row['step_s']:.2f} | {row['step_s'] * row['steps_per_epoch']:.0f} | {row['gflop']:.1f} | "
            f"{row['achieved']:.1f} | {row['gemm']:.1f} | {row['achieved'] / row['gemm']:.2f} | {ratio} | "
            f"{row['anomaly_step_s']:.2f} | {row['peak_rss_mib']:.0f} | {', '.join(row['top'])} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["SASRec", "MMSASRec", "FMRLRec", "MMM4Rec", "MMESID", "Speeder"])
    parser.add_argument("--widths", nargs="+", default=["default", "64"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=0, help="override every model's train_batch_size (0: keep)")
    parser.add_argument("--quick", action="store_true", help="SASRec and MMM4Rec only, 2 measured steps")
    parser.add_argument("--output", type=Path, default=RESULTS / "profile_scientific.md")
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps = [m for m in args.models if m in ("SASRec", "MMM4Rec")], 2

    import torch

    from recbole_mm.experiments.measure import machine_description

    torch.set_num_threads(1)  # the machine line names the configurations' thread count
    load_before = os.getloadavg()[0]
    rows = []
    for width in args.widths:
        for model in args.models:
            if model in WIDE_BY_DEFAULT and width != "default":
                continue
            for row in in_fresh_process(profile_one, model, width, args.steps, args.batch_size):
                rows.append(row)
                print(f"done {row['model']} width {width}: {row.get('step_s', row.get('error'))}", flush=True)
    header = (f"Scientific train split (item lists cut to the last 20), median of {args.steps} training steps "
              f"after a warm-up, each configuration in a fresh process, 1 torch thread, CPU time.\n"
              f"machine: {machine_description()} (load average {load_before:.1f} at start)")
    table = markdown(rows, header)
    print("\n" + table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, f"# Training-step profile\n\n`python benchmarks/bench_profile.py "
                                   f"{' '.join(sys.argv[1:])}`\n\n{table}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
