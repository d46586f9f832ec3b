"""Side-by-side tables: several models x datasets x seeds, same split/seed/evaluation settings.

    python -m recbole_mm.experiments table --models SASRec MMSASRec FMRLRec --datasets Scientific \
        [--seeds 2020 2021] [--config_files a.yaml b.yaml] [--model_config_files FMRLRec=fmrl.yaml] \
        [--output results/] [--latex] [--in_process] [--timeout=SECONDS] [--key=value ...]

Every (model, dataset, seed) cell trains through ``recbole_mm.quick_start`` (via
``recbole_mm.measure``) with the same configuration layers plus ``seed``; ``--key=value`` overrides
apply to every cell. Each cell's result is stored as ``<output>/cells/<model>_<dataset>_seed<seed>_<hash>.json``
where ``<hash>`` hashes the cell's effective configuration: a rerun reads finished cells instead of
training them again, and any change of configuration (yaml defaults included) gives a new cell.
A failed cell is stored with its error, shown in the table and retried on the next run; the other
cells carry on. Outputs: ``table.md`` (one table per dataset, best value per column in bold,
mean ± sample std over seeds), ``table.csv`` (same, one row per dataset and model), ``cells.csv``
(one row per cell) and, with ``--latex``, ``table.tex``.
"""
import argparse
import csv
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from recbole_mm.compat import plain_config
from recbole_mm.config import Config
from recbole_mm.measure import (
    config_hash,
    effective_config,
    machine_description,
    measured_run,
    measured_run_in_fresh_process,
)

RESOURCE_COLUMNS = (
    # (record key, header, lower is better)
    ("parameters", "trainable params", True),
    ("seconds_per_epoch", "s/epoch", True),
    ("epochs_to_best", "epochs to best", None),  # not a quality measure: never marked
    ("peak_rss_mib", "peak RSS MiB", True),
    ("peak_gpu_mib", "peak GPU MiB", True),
    ("wall_seconds", "wall s", True),  # the whole cell: also a pipeline's stages outside its epochs (MMESID, Speeder)
)


# What decides how a cell is evaluated. A table compares models only if every cell uses the same
# values, so these come from the shared layers (RecBole's and recbole-mm's overall and dataset yaml,
# --config_files, overrides) and replace what a model's own yaml or a per-model file sets
# (MMESID.yaml's Hit@5/10/20, for instance).
EVALUATION_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "valid_metric_bigger", "metric_decimal_place",
                   "candidate_protocol", "num_candidates", "candidate_seed", "candidate_file")


class _SharedLayersConfig(Config):
    """A model's configuration without its own yaml files (RecBole's or recbole-mm's)."""

    def _update_internal_config_dict(self, file):
        if Path(file).parent.name == "model":
            return {}
        return super()._update_internal_config_dict(file)


def shared_evaluation_settings(model, dataset, config_file_list, config_dict, cmd_args):
    config = plain_config(_SharedLayersConfig(model, dataset, config_file_list, config_dict, cmd_args))
    return {key: config[key] for key in EVALUATION_KEYS if key in config}


class ResultsStore:
    """One JSON file per cell under ``<root>/cells``, keyed by model, dataset, seed and config hash."""

    def __init__(self, root):
        self.cells_dir = Path(root) / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)

    def path(self, model, dataset, seed, hash_):
        return self.cells_dir / f"{model}_{dataset}_seed{seed}_{hash_}.json"

    def load(self, model, dataset, seed, hash_):
        path = self.path(model, dataset, seed, hash_)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a half-written file from an interrupted run: recompute the cell
            return None

    def save(self, record):
        path = self.path(record["model"], record["dataset"], record["seed"], record["config_hash"])
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        os.replace(partial, path)  # atomic: a store never holds half a cell


def run_cell(store, model, dataset, seed, config_file_list, config_dict, cmd_args, isolate=True, timeout=None,
             log=print, model_config_files=()):
    """Read the cell from the store when it finished before, else train it; return its record.

    ``config_file_list`` is shared by every cell, ``model_config_files`` is this model's own: the
    evaluation settings (``EVALUATION_KEYS``) always come from the shared layers."""
    record = {"model": model, "dataset": dataset, "seed": seed}
    try:
        evaluation = shared_evaluation_settings(model, dataset, config_file_list, config_dict, cmd_args)
        cell_config = {**config_dict, **evaluation, "seed": seed}
        cell_files = list(config_file_list) + list(model_config_files)
        config = effective_config(model, dataset, cell_files, {**config_dict, "seed": seed}, cmd_args)
        replaced = {key: config.get(key) for key, value in evaluation.items() if config.get(key) != value}
        if replaced:  # only then does pinning change anything, and the pinned config must be rebuilt
            log(f"[{model} / {dataset} / seed {seed}] the table's evaluation settings replace the model's own: "
                + "; ".join(f"{key} {replaced[key]} -> {evaluation[key]}" for key in replaced))
            config = effective_config(model, dataset, cell_files, cell_config, cmd_args)
    except Exception as error:  # e.g. unknown model: reported in the table, the other cells go on
        log(f"[{model} / {dataset} / seed {seed}] configuration failed: {error}")
        return {**record, "status": "failed", "config_hash": None, "error": f"{type(error).__name__}: {error}"}
    record["config_hash"] = config_hash(config)
    stored = store.load(model, dataset, seed, record["config_hash"])
    if stored and stored.get("status") == "ok":
        log(f"[{model} / {dataset} / seed {seed}] finished before: read "
            f"{store.path(model, dataset, seed, record['config_hash'])}")
        return {**stored, "reused": True}
    log(f"[{model} / {dataset} / seed {seed}] training (config {record['config_hash']})")
    start = time.perf_counter()
    if isolate:
        result = measured_run_in_fresh_process(model, dataset, cell_files, cell_config, cmd_args, timeout=timeout)
    else:
        try:
            result = {"status": "ok", **measured_run(model, dataset, cell_files, cell_config, cmd_args)}
        except Exception as error:
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    record.update(result, model=model, dataset=dataset, seed=seed, wall_seconds=time.perf_counter() - start,
                  machine=machine_description(), finished_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                  peak_memory_scope="own process" if isolate else "whole runner process so far",
                  config=config)
    store.save(record)
    if record["status"] != "ok":
        log(f"[{model} / {dataset} / seed {seed}] FAILED: {record['error']}")
    return {**record, "reused": False}


def metric_lower_is_better(metric_key):
    from recbole.evaluator.register import smaller_metrics

    return metric_key.split("@")[0].lower() in smaller_metrics


def summarize(records):
    """Group cell records by (dataset, model): per column the values over seeds, plus failures."""
    groups = {}
    for record in records:
        group = groups.setdefault((record["dataset"], record["model"]), {"values": {}, "errors": [], "seeds": []})
        group["seeds"].append(record["seed"])
        if record["status"] != "ok":
            group["errors"].append(f"seed {record['seed']}: {record['error']}")
            continue
        columns = {f"test {key}": value for key, value in record["test_result"].items()}
        columns.update({key: record.get(key) for key, _, _ in RESOURCE_COLUMNS})
        for column, value in columns.items():
            if value is not None:
                group["values"].setdefault(column, []).append(float(value))
    return groups


def mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_columns(groups, dataset):
    metric_columns, resource_columns = [], []
    for (group_dataset, _), group in groups.items():
        if group_dataset != dataset:
            continue
        for column in group["values"]:
            if column.startswith("test ") and column not in metric_columns:
                metric_columns.append(column)
    for key, header, _ in RESOURCE_COLUMNS:
        if any(key in group["values"] for (group_dataset, _), group in groups.items() if group_dataset == dataset):
            resource_columns.append(key)
    return metric_columns + resource_columns


def column_direction(column):
    """True: lower is better; False: higher is better; None: not ranked."""
    if column == "result":
        return None
    if column.startswith("test "):
        return metric_lower_is_better(column[len("test "):])
    return next(lower for key, _, lower in RESOURCE_COLUMNS if key == column)


def column_header(column):
    return next((header for key, header, _ in RESOURCE_COLUMNS if key == column), column)


def best_models(groups, dataset, column):
    """Models whose mean is the best in this column (all of them when tied); failed cells excluded."""
    lower = column_direction(column)
    if lower is None:
        return set()
    means = {model: mean_std(group["values"][column])[0] for (group_dataset, model), group in groups.items()
             if group_dataset == dataset and not group["errors"] and column in group["values"]}
    if not means:
        return set()
    best = (min if lower else max)(means.values())
    return {model for model, mean in means.items() if mean == best}


DECIMALS = {"parameters": 0, "seconds_per_epoch": 2, "epochs_to_best": 1, "peak_rss_mib": 0, "peak_gpu_mib": 0,
            "wall_seconds": 0}


def format_value(column, mean, std):
    decimals = 4 if column.startswith("test ") else DECIMALS[column]
    if std is None and column == "epochs_to_best":
        decimals = 0
    text = f"{mean:,.{decimals}f}"
    return text if std is None else f"{text} ± {std:,.{decimals}f}"


def short_error(text, limit=200):
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " …"


def cell_texts(groups, dataset, model, columns):
    group = groups[(dataset, model)]
    if group["errors"] and not group["values"]:
        return ["failed: " + short_error("; ".join(group["errors"]))] + ["–"] * (len(columns) - 1)
    texts = []
    for column in columns:
        mean, std = mean_std(group["values"].get(column, []))
        texts.append("–" if mean is None else format_value(column, mean, std))
    return texts


def write_markdown(path, groups, datasets, models, seeds, header_lines):
    lines = ["# recbole-mm side-by-side results", ""] + header_lines + [""]
    for dataset in datasets:
        columns = table_columns(groups, dataset) or ["result"]
        lines += [f"## {dataset}", "", "| model | " + " | ".join(column_header(c) for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        bests = {column: best_models(groups, dataset, column) for column in columns}
        for model in models:
            texts = cell_texts(groups, dataset, model, columns)
            group = groups[(dataset, model)]
            if not group["errors"]:
                texts = [f"**{text}**" if model in bests[column] else text for column, text in zip(columns, texts)]
            elif group["values"]:  # some seeds failed: say so, do not rank it
                texts[0] += f" (failed: {len(group['errors'])} of {len(group['seeds'])} seeds)"
            lines.append(f"| {model} | " + " | ".join(texts) + " |")
        lines.append("")
    failures = [f"- {model} / {dataset}: " + short_error("; ".join(group["errors"]), 1000)
                for (dataset, model), group in groups.items() if group["errors"]]
    if failures:
        lines += ["Failed cells (retried on the next run):", ""] + failures + [""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def write_csv(path, groups, datasets, models):
    columns = []
    for dataset in datasets:
        columns += [c for c in table_columns(groups, dataset) if c not in columns]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["dataset", "model", "seeds", "failed"] +
                        [name for c in columns for name in (f"{c} mean", f"{c} std", f"{c} best")])
        for dataset in datasets:
            bests = {column: best_models(groups, dataset, column) for column in columns}
            for model in models:
                group = groups[(dataset, model)]
                row = [dataset, model, len(group["seeds"]), "; ".join(group["errors"])]
                for column in columns:
                    mean, std = mean_std(group["values"].get(column, []))
                    row += [mean if mean is not None else "", std if std is not None else "",
                            int(model in bests[column])]
                writer.writerow(row)


def write_cells_csv(path, records):
    metric_keys = []
    for record in records:
        metric_keys += [k for k in record.get("test_result", {}) if k not in metric_keys]
    fields = ["dataset", "model", "seed", "status", "reused", "config_hash"] + [f"test {k}" for k in metric_keys] + \
        [key for key, _, _ in RESOURCE_COLUMNS] + ["epochs", "error"]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            row = {**record, **{f"test {k}": v for k, v in record.get("test_result", {}).items()}}
            writer.writerow({field: row.get(field, "") for field in fields})


def latex_escape(text):
    return str(text).replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&") \
        .replace("#", "\\#")


def write_latex(path, groups, datasets, models):
    parts = ["% recbole-mm side-by-side results (needs \\usepackage{booktabs})"]
    for dataset in datasets:
        columns = table_columns(groups, dataset) or ["result"]
        bests = {column: best_models(groups, dataset, column) for column in columns}
        parts += [f"% {latex_escape(dataset)}", "\\begin{tabular}{l" + "r" * len(columns) + "}", "\\toprule",
                  "Model & " + " & ".join(latex_escape(column_header(c)) for c in columns) + " \\\\", "\\midrule"]
        for model in models:
            group = groups[(dataset, model)]
            texts = [latex_escape(t).replace(" ± ", " $\\pm$ ") for t in cell_texts(groups, dataset, model, columns)]
            if group["errors"] and not group["values"]:
                texts = [f"\\multicolumn{{{len(columns)}}}{{l}}{{failed}}"]
            elif not group["errors"]:
                texts = [f"\\textbf{{{t}}}" if model in bests[c] else t for c, t in zip(columns, texts)]
            parts.append(latex_escape(model) + " & " + " & ".join(texts) + " \\\\")
        parts += ["\\bottomrule", "\\end{tabular}", ""]
    Path(path).write_text("\n".join(parts), encoding="utf-8")


def run_table(models, datasets, seeds=(2020,), config_file_list=None, config_dict=None, cmd_args=(),
              output="results", latex=False, isolate=True, timeout=None, model_config_files=None, log=print):
    """Run (or read from the store) every cell and write the tables; return the cell records.

    ``model_config_files``: {model: [yaml, ...]} applied after ``config_file_list`` for that model
    only (its own hyperparameters; split, seed and evaluation stay shared)."""
    model_config_files = model_config_files or {}
    unknown = set(model_config_files) - set(models)
    if unknown:
        raise ValueError(f"model config files given for {sorted(unknown)}, which are not in --models {models}")
    for arg in cmd_args:
        if arg.startswith("--seed="):
            raise ValueError("--seed=... would give every cell the same seed: pass the seeds with --seeds.")
    output = Path(output)
    store = ResultsStore(output)
    config_dict = {"checkpoint_dir": str(output / "checkpoints"), "show_progress": False, **(config_dict or {})}
    records = [run_cell(store, model, dataset, seed, config_file_list or [], config_dict, cmd_args, isolate, timeout,
                        log, model_config_files.get(model, []))
               for dataset in datasets for model in models for seed in seeds]
    groups = summarize(records)
    reused = sum(record.get("reused", False) for record in records)
    failed = sum(record["status"] != "ok" for record in records)
    header = [
        f"Machine: {machine_description()}.",
        f"Seeds: {', '.join(map(str, seeds))} ({'mean ± sample std over seeds' if len(seeds) > 1 else 'one seed'}); "
        f"test metrics of the best-validation checkpoint; best per column in bold (fewest for parameters, "
        f"time and memory); peak RSS is each cell's own process"
        + ("" if isolate else " (not here: cells ran in one process, so it is the running maximum)") + ".",
        f"Cells: {len(records)} ({reused} read from the store, {failed} failed). Overrides: "
        + (" ".join(cmd_args) if cmd_args else "none")
        + (f"; config files: {' '.join(config_file_list)}" if config_file_list else "") + ".",
    ]
    write_markdown(output / "table.md", groups, datasets, models, seeds, header)
    write_csv(output / "table.csv", groups, datasets, models)
    write_cells_csv(output / "cells.csv", records)
    if latex:
        write_latex(output / "table.tex", groups, datasets, models)
    log(f"wrote {output / 'table.md'}, {output / 'table.csv'}, {output / 'cells.csv'}"
        + (f", {output / 'table.tex'}" if latex else ""))
    return records


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds through measured_run_in_fresh_process, which then kills the cell's process
    raise SystemExit(128 + signum)


def main(argv=None):
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="run models x datasets x seeds and write the tables", allow_abbrev=False)
    table.add_argument("--models", nargs="+", required=True)
    table.add_argument("--datasets", nargs="+", required=True)
    table.add_argument("--seeds", nargs="+", type=int, default=[2020])
    table.add_argument("--config_files", nargs="+", default=None, help="yaml files applied to every cell")
    table.add_argument("--model_config_files", nargs="+", default=[], metavar="MODEL=FILE",
                       help="yaml applied to one model only, e.g. FMRLRec=fmrl.yaml (repeatable)")
    table.add_argument("--output", default="results")
    table.add_argument("--latex", action="store_true", help="also write table.tex")
    table.add_argument("--in_process", action="store_true",
                       help="run cells in this process (faster start; peak RSS is then not per cell)")
    table.add_argument("--timeout", type=float, default=None, help="seconds per cell (fresh-process mode)")
    args, overrides = parser.parse_known_args(argv)
    bad = [arg for arg in overrides if not (arg.startswith("--") and "=" in arg)]
    if bad:
        parser.error(f"unrecognized arguments {bad}: overrides must be --key=value")
    model_config_files = {}
    for item in args.model_config_files:
        if "=" not in item:
            parser.error(f"--model_config_files takes MODEL=FILE, got {item!r}")
        model, file = item.split("=", 1)
        model_config_files.setdefault(model, []).append(file)
    try:
        records = run_table(args.models, args.datasets, args.seeds, args.config_files, cmd_args=overrides,
                            output=args.output, latex=args.latex, isolate=not args.in_process, timeout=args.timeout,
                            model_config_files=model_config_files)
    except ValueError as error:
        parser.error(str(error))
    print((Path(args.output) / "table.md").read_text(encoding="utf-8"))
    return 1 if all(record["status"] != "ok" for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
