"""MMESID benchmarks on Scientific (benchmark split), printed as tables with the machine named.

    python benchmarks/bench_mmesid.py stages [--out saved/bench_mmesid] [--key=value ...]
    python benchmarks/bench_mmesid.py length [--levels 4] [--batch 64] [--repeats 5]

stages: every stage in its own subprocess (wall time and that process's peak RSS), CPU default
backbone (small untrained Llama, full tuning):
  collab (RecBole SASRec -> E_c; its test metrics are the SASRec row), tokenizer (MM-RQ-VAE, MMD),
  tokenizer-mse (MSE reconstruction), llm (MMESID, SID tables from codebooks), llm-random
  (sid_init: random), mmsasrec (MMSASRec on the same split). Then Kendall's tau of behaviour-target
  distances on the test split against E_c: quantised collaborative embedding after the MMD / MSE
  RQ-VAE, and the collaborative SID embeddings after fine-tuning with codebook / random init; and
  singular-value spectra (CSV + PNG) of E_c, the eq.-16 input table and E_x.
  Extra ``--key=value`` go to every MMESID stage (e.g. --epochs=3); ``--baseline_KEY=V`` go to the
  MMSASRec run as ``--KEY=V`` (default 50 epochs, early stopping 5, as the stage-1 SASRec).
length: LLM input length per test user, MMESID (one token per history item) vs a TIGER-style
  input (L semantic-ID tokens per item), and the decoder forward time of both on one backbone
  (paper Sec. 4.4: N vs N x L), for the CPU default backbone and a larger one.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from recbole_mm.experiments.measure import machine_description  # noqa: E402
from recbole_mm.utils.atomic import write_text_atomic  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

DATASET = "Scientific"


# --------------------------------------------------------------------------------------------
# stages: one subprocess per stage
# --------------------------------------------------------------------------------------------
VARIANTS = {
    "collab": ("collab", []),
    "tokenizer": ("tokenizer", []),
    "tokenizer-mse": ("tokenizer", ["--rqvae_recon_loss=mse"]),
    "llm": ("llm", []),
    "llm-random": ("llm", ["--sid_init=random"]),
    "mmsasrec": ("mmsasrec", []),
}


def worker(stage, out_file, cmd_args):
    """Run one stage in this process; write its wall time, peak RSS and results as JSON.
    ``--baseline_KEY=V`` is ``--KEY=V`` for the MMSASRec run; every other argument goes to MMESID."""
    baseline = ["--" + a[len("--baseline_"):] for a in cmd_args if a.startswith("--baseline_")]
    cmd_args = [a for a in cmd_args if not a.startswith("--baseline_")]
    from recbole_mm.quick_start.mmesid import export_item_tables, prepare_run
    from recbole_mm.quick_start import run

    start = time.perf_counter()
    result = {}
    if stage in ("collab", "tokenizer"):
        prepared = prepare_run(DATASET, cmd_args=cmd_args, stop_after=stage)
        result["files"] = prepared
    elif stage == "llm":
        prepared = prepare_run(DATASET, cmd_args=cmd_args)  # cached: the earlier stages ran already
        start = time.perf_counter()
        result = run("MMESID", DATASET, config_dict=prepared, cmd_args=cmd_args)
    else:
        # same protocol and stopping rule as the SASRec of stage 1 (properties/model/MMESID.yaml collab_config)
        settings = dict(arg[2:].split("=", 1) for arg in [
            *[a for a in cmd_args if a.startswith("--checkpoint_dir")], "--metrics=['Hit','NDCG']",
            "--topk=[5,10,20]", "--epochs=50", "--stopping_step=5", "--train_batch_size=256", *baseline])
        result = run("MMSASRec", DATASET, cmd_args=[f"--{key}={value}" for key, value in settings.items()])
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if stage == "llm":
        result["tables_file"] = str(export_item_tables(DATASET, result["checkpoint"], config_dict=prepared,
                                                       cmd_args=cmd_args))
        result["files"] = prepared
    write_text_atomic(out_file, json.dumps({"stage": stage, "wall_s": wall, "peak_rss_mb": peak_mb,
                                            "result": result}, default=str))


def run_variant(name, out_dir, extra):
    stage, args = VARIANTS[name]
    out_file = out_dir / f"{name}.json"
    if out_file.is_file():
        return json.loads(out_file.read_text())
    cmd = [sys.executable, __file__, "worker", stage, str(out_file), *args, *extra]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    with open(out_dir / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir)
    return json.loads(out_file.read_text())


def stages(out_dir, extra, skip=()):
    from recbole_mm.tools.embedding_analysis import behaviour_target_kendall, load_item_matrix, split_sequences, write_spectrum

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [*extra, f"--checkpoint_dir={out_dir / 'saved'}"]
    records = {name: run_variant(name, out_dir, extra) for name in VARIANTS if name not in skip}

    print(f"\nMMESID stages on {DATASET}, CPU default backbone. Machine: {machine_description()}")
    print(f"{'stage':<15}{'wall s':>10}{'peak RSS MB':>14}")
    for name, record in records.items():
        print(f"{name:<15}{record['wall_s']:>10.1f}{record['peak_rss_mb']:>14.0f}")

    collab_file = records["llm"]["result"]["files"]["mmesid_collab_file"]
    sasrec = torch.load(collab_file, weights_only=True)["test_result"]
    rows = {"SASRec (stage 1)": sasrec, "MMESID": records["llm"]["result"]["test_result"],
            "MMESID-random": records["llm-random"]["result"]["test_result"]}
    if "mmsasrec" in records:
        rows["MMSASRec"] = records["mmsasrec"]["result"]["test_result"]
    metrics = ["hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20"]
    print(f"\nTest, full ranking ({DATASET} leave-one-out split)")
    print(f"{'model':<18}" + "".join(f"{m:>10}" for m in metrics))
    for name, result in rows.items():
        print(f"{name:<18}" + "".join(f"{float(result.get(m, result.get(m.replace('hit', 'recall'), float('nan')))):>10.4f}"
                                      for m in metrics))

    for name in ("tokenizer", "tokenizer-mse"):
        sid = torch.load(records[name]["result"]["files"]["mmesid_sid_file"], weights_only=True)
        print(f"\n{name}: " + "; ".join(
            f"{m}: {s['distinct_ids']}/{s['items']} distinct IDs, {s['colliding_items']} colliding items, "
            f"recon cos {s.get('cosine', float('nan')):.3f}" for m, s in sid["stats"].items() if m != "joint")
            + f"; all modalities together: {sid['stats']['joint']['colliding_items']} colliding items")

    dataset, item_seq, item_seq_len, targets = split_sequences(DATASET, "test")
    e_c = load_item_matrix(f"{collab_file}:embedding", dataset)

    def files(name):
        return records[name]["result"]["files"]

    # each embedding against the E_c its own run was built from
    pairs = {
        "RQ-VAE MMD: quantised E_c (before fine-tuning)": ("tokenizer", f"{files('tokenizer')['mmesid_sid_file']}:quantized.collab"),
        "RQ-VAE MSE: quantised E_c (before fine-tuning)":
            ("tokenizer-mse", f"{files('tokenizer-mse')['mmesid_sid_file']}:quantized.collab"),
        "codebook init: collab SID embedding after fine-tuning":
            ("llm", f"{records['llm']['result']['tables_file']}:quantized.collab"),
        "random init: collab SID embedding after fine-tuning":
            ("llm-random", f"{records['llm-random']['result']['tables_file']}:quantized.collab"),
    }
    print(f"\nKendall's tau of behaviour-target Euclidean distances vs E_c ({DATASET} test split, "
          f"{int(item_seq_len.sum())} pairs)")
    for label, (run_name, spec) in pairs.items():
        own_e_c = load_item_matrix(f"{files(run_name)['mmesid_collab_file']}:embedding", dataset)
        tau = behaviour_target_kendall(own_e_c, load_item_matrix(spec, dataset), item_seq, item_seq_len, targets)
        print(f"  {label:<58}{tau:>8.4f}   ({Path(files(run_name)['mmesid_sid_file']).name})")

    spectra = {"E_c (SASRec)": e_c[1:],
               "MMESID input (codebook init)": load_item_matrix(f"{records['llm']['result']['tables_file']}:input_table")[1:],
               "MMESID input (random init)":
                   load_item_matrix(f"{records['llm-random']['result']['tables_file']}:input_table")[1:],
               "MMESID target E_x": load_item_matrix(f"{records['llm']['result']['tables_file']}:target_table")[1:]}
    csv_path, png_path = write_spectrum(spectra, out_dir / "spectrum")
    print(f"\nsingular-value spectra: {csv_path}, {png_path}")


# --------------------------------------------------------------------------------------------
# length: N vs N x L
# --------------------------------------------------------------------------------------------
def length(levels, batch, repeats):
    from recbole_mm.config import Config
    from recbole_mm.tools.embedding_analysis import split_sequences
    from recbole_mm.model.layers.llm import backbone_from_config, build_prompt_ids

    _, _, item_seq_len, _ = split_sequences(DATASET, "test")
    config = Config("MMESID", DATASET)
    backbones = {"CPU default (64-d, 2 layers)": {},
                 "larger (256-d, 4 layers)": {"llm_hidden_size": 256, "llm_num_layers": 4, "llm_num_heads": 4}}
    print(f"LLM input length per test user on {DATASET} ({len(item_seq_len)} users, history capped at "
          f"{config['MAX_ITEM_LIST_LENGTH']}). Machine: {machine_description()}")
    torch.manual_seed(0)
    for label, sizes in backbones.items():
        llm = backbone_from_config({**{k: config[k] for k in config.final_config_dict if k.startswith("llm_")},
                                    **sizes, "llm_tuning": "frozen"},
                                   vocab_texts=[config["instruction"], config["response_header"]]).eval()
        prefix, suffix = llm.encode(config["instruction"]), llm.encode(config["response_header"])
        lengths = {"MMESID (N)": item_seq_len, f"TIGER-style (N x L, L={levels})": item_seq_len * levels}
        times = {}
        for name, n_tokens in lengths.items():
            total = len(prefix) + n_tokens + len(suffix)
            rows = n_tokens[:batch]
            input_ids, mask = build_prompt_ids(prefix, rows, suffix, llm.placeholder_id, llm.tokenizer.pad_token_id)
            embeds = llm.embed_tokens(input_ids)
            with torch.no_grad():
                llm.last_hidden_state(embeds, mask)  # warm-up
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    llm.last_hidden_state(embeds, mask)
                    samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)
            if label.startswith("CPU"):
                print(f"  {name:<28} prompt tokens mean {total.float().mean():.1f}, median "
                      f"{total.float().median():.0f}, max {int(total.max())}")
        (a, ta), (b, tb) = times.items()
        print(f"  {label}: forward of {batch} test prompts, median of {repeats}: {a} {ta * 1e3:.1f} ms, "
              f"{b} {tb * 1e3:.1f} ms, ratio {tb / ta:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stage_parser = sub.add_parser("stages")
    stage_parser.add_argument("--out", default=str(PROJECT_ROOT / "saved" / "bench_mmesid"))
    stage_parser.add_argument("--skip", nargs="*", default=[], choices=list(VARIANTS),
                              help="leave these runs out (e.g. mmsasrec when time is short)")
    length_parser = sub.add_parser("length")
    length_parser.add_argument("--levels", type=int, default=4)
    length_parser.add_argument("--batch", type=int, default=64)
    length_parser.add_argument("--repeats", type=int, default=5)
    worker_parser = sub.add_parser("worker")
    worker_parser.add_argument("stage")
    worker_parser.add_argument("out_file")
    args, extra = parser.parse_known_args()
    if args.command == "worker":
        worker(args.stage, args.out_file, extra)
    elif args.command == "stages":
        stages(args.out, extra, args.skip)
    else:
        length(args.levels, args.batch, args.repeats)


if __name__ == "__main__":
    main()
