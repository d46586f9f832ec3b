"""Full-sort evaluation over an Amazon-scale catalogue: peak memory and users/s, chunked vs not.

    python benchmarks/bench_catalogue.py [--items 450000] [--dim 768] [--users 1024] [--batches 2]
                                         [--models MMSASRec FMRLRec MMM4Rec MMESID] [--chunks 65536 0]
                                         [--output FILE.md] [--work DIR]

A synthetic dataset (benchmark layout, item tokens = feature rows): ``--items`` items listed in a
``.item`` file (so every one is in the catalogue RecBole scores), ``--users`` users with 20-item
histories, and two raw float32 feature tables of ``--items`` x ``--dim`` (text and image, random
values), read through the feature hook's memory map. MMESID gets random stage files (collaborative
table, codes, codebooks): this measures its scoring, not its tokenizer.

Each (model, full_sort_item_chunk) pair runs in a fresh process with one torch thread, width 64:
build the model (RSS after building: the memory-mapped tables, RecBole's data), then score
``--batches`` test batches of ``eval_batch_size`` 256 users the way RecBole's full-sort evaluation does
(``full_sort_predict`` + top-20 over all items) under ``no_grad``. Reported: users/s (wall time of the
scoring), RSS after building, peak RSS, and the peak's growth while scoring. ``0`` = no chunking (the
whole catalogue at once). A configuration that runs out of memory or fails is a row saying so.
"""
import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_mm.utils.atomic import atomic_path, torch_save_atomic, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "Catalogue"
HISTORY = 20
WIDTH = 64
SETTINGS = {
    "MMSASRec": {"inner_size": 128},
    "FMRLRec": {"mrl_sizes": [8, 16, 32, 64]},
    "MMM4Rec": {"inner_size": 128, "head_dim": 16, "n_groups": 8, "d_state": 32},
    "MMESID": {"llm_hidden_size": WIDTH, "llm_num_layers": 2, "llm_num_heads": 4},
}


def write_dataset(root, n_items, dim, n_users, seed=0):
    """The synthetic catalogue under root/NAME; returns its config dict. Reuses a complete earlier copy."""
    target = Path(root) / NAME
    done = target / ".complete"
    config = {
        "data_path": str(root), "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "TIME_FIELD": None, "modalities": ["text", "image"],
        "feature_tables": {"text": {"path": f"{NAME}.text.f32", "dim": dim},
                           "image": {"path": f"{NAME}.image.f32", "dim": dim}},
    }
    if done.is_file() and done.read_text() == f"{n_items} {dim} {n_users} {seed}":
        return config
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for modality in ("text", "image"):
        with atomic_path(target / f"{NAME}.{modality}.f32") as temporary:
            table = np.memmap(temporary, dtype=np.float32, mode="w+", shape=(n_items, dim))
            for start in range(0, n_items, 50_000):
                rows = min(50_000, n_items - start)
                table[start:start + rows] = rng.standard_normal((rows, dim), dtype=np.float32)
            table.flush()
            del table
    write_text_atomic(target / f"{NAME}.item", "item_id:token\n" + "".join(f"{i}\n" for i in range(n_items)))
    for offset, split in enumerate(("train", "valid", "test")):
        lines = ["user_id:token\titem_id_list:token_seq\titem_id:token"]
        for user in range(n_users):
            items = rng.integers(0, n_items, HISTORY + 3)
            history = items[offset:offset + HISTORY]
            lines.append(f"{user}\t{' '.join(map(str, history))}\t{items[offset + HISTORY]}")
        write_text_atomic(target / f"{NAME}.{split}.inter", "\n".join(lines) + "\n")
    write_text_atomic(done, f"{n_items} {dim} {n_users} {seed}")
    return config


def mmesid_stage_files(root, n_items, hidden, levels=4, codes=256, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = [str(i) for i in range(n_items)]
    collab, sid = Path(root) / "collab.pt", Path(root) / "sid.pt"
    if not sid.is_file():
        torch_save_atomic({"item_tokens": tokens, "embedding": torch.randn(n_items, hidden, generator=generator)}, collab)
        channels = ["collab", "text", "image"]
        torch_save_atomic({"item_tokens": tokens,
                           "codes": {m: torch.randint(0, codes, (n_items, levels), generator=generator) for m in channels},
                           "codebooks": {m: torch.randn(levels, codes, hidden, generator=generator) for m in channels}},
                          sid)
    return {"mmesid_collab_file": str(collab), "mmesid_sid_file": str(sid)}


def rss_mib():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def score_one(model_name, chunk, data_config, batches, queue):
    """Child process: build one model, score ``batches`` test batches; put a result dict on ``queue``."""
    try:
        import logging

        import torch

        torch.set_num_threads(1)
        from recbole_mm.quick_start import build

        logging.disable(logging.INFO)
        os.chdir(tempfile.mkdtemp(prefix="bench_catalogue_"))
        config_dict = {**data_config, "hidden_size": WIDTH, "eval_batch_size": 256, "show_progress": False,
                       "full_sort_item_chunk": chunk, **SETTINGS[model_name]}
        if model_name == "MMESID":
            config_dict.update(mmesid_stage_files(data_config["data_path"], catalogue_items(data_config), WIDTH))
        _, (_, _, test_data), model, _ = build(model_name, NAME, config_dict=config_dict)
        model.eval()
        built_rss = rss_mib()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        users, start = 0, time.perf_counter()
        with torch.no_grad():
            for _, batch in zip(range(batches), test_data):
                interaction = batch[0].to(model.device)
                scores = model.full_sort_predict(interaction).view(len(interaction), -1)
                scores[:, 0] = -np.inf
                torch.topk(scores, 20, dim=-1)
                users += len(interaction)
                del scores
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put({"model": model_name, "chunk": chunk, "status": "ok", "n_items": model.n_items - 1,
                   "users": users, "users_per_s": users / seconds, "built_rss": built_rss,
                   "peak_rss": peak, "scoring_growth": max(0.0, peak - max(peak_before, built_rss))})
    except Exception as error:  # reported in the table; the other configurations still run
        queue.put({"model": model_name, "chunk": chunk, "status": "failed", "error": f"{type(error).__name__}: {error}"})


def catalogue_items(data_config):
    return int((Path(data_config["data_path"]) / NAME / ".complete").read_text().split()[0])


def run_isolated(model_name, chunk, data_config, batches):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=score_one, args=(model_name, chunk, data_config, batches, queue))
    process.start()
    process.join()
    if process.exitcode != 0:  # killed (out of memory) before it could report
        return {"model": model_name, "chunk": chunk, "status": "failed", "error": f"process exit code {process.exitcode}"}
    return queue.get()


def markdown(rows, header):
    lines = [header, "", "| model | full_sort_item_chunk | items | users/s | RSS after build MiB | peak RSS MiB | "
             "peak growth while scoring MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        chunk = row["chunk"] or "0 (whole catalogue)"
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {chunk} | | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['model']} | {chunk} | {row['n_items']:,} | {row['users_per_s']:.1f} | "
                     f"{row['built_rss']:.0f} | {row['peak_rss']:.0f} | {row['scoring_growth']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    from recbole_mm.experiments.measure import machine_description

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=450_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--chunks", nargs="+", type=int, default=[65536, 0])
    parser.add_argument("--work", default=None, help="folder for the synthetic dataset (default: a temporary one)")
    parser.add_argument("--output", default=str(RESULTS / "catalogue_eval.md"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="catalogue_"))
    print(f"writing the synthetic catalogue ({args.items:,} x {args.dim}, 2 tables) to {work}", flush=True)
    data_config = write_dataset(work, args.items, args.dim, args.users)
    rows = []
    for model_name in args.models:
        for chunk in args.chunks:
            print(f"[bench] {model_name} full_sort_item_chunk={chunk}", flush=True)
            rows.append(run_isolated(model_name, chunk, data_config, args.batches))
            print(markdown(rows[-1:], "").strip().splitlines()[-1], flush=True)
    import torch

    torch.set_num_threads(1)
    header = (f"Full-sort evaluation over a synthetic {args.items:,}-item catalogue (text + image, {args.dim}-d each, "
              f"memory-mapped), width {WIDTH}, {args.batches} batches of 256 users, top-20 per user.\n"
              f"Machine: {machine_description()}.")
    table = markdown(rows, header)
    write_text_atomic(args.output, table)
    print("\n" + table)


if __name__ == "__main__":
    main()
