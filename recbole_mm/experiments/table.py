"""Side-by-side tables: several models x datasets x seeds, same split/seed/evaluation settings.

    python -m recbole_mm.experiments table --models SASRec MMSASRec FMRLRec --datasets Scientific \
        [--seeds 2020 2021] [--config_files a.yaml b.yaml] [--model_config_files FMRLRec=fmrl.yaml] \
        [--output results/] [--latex] [--in_process] [--timeout=SECONDS] [--key=value ...]

Every (model, dataset, seed) cell trains through ``recbole_mm.quick_start`` (via
``recbole_mm.experiments.measure``) with the same configuration layers plus ``seed``; ``--key=value`` overrides
apply to every cell. Each cell's result is stored as ``<output>/cells/<model>_<dataset>_seed<seed>_<hash>.json``
where ``<hash>`` hashes the cell's effective configuration: a rerun reads finished cells instead of
training them again, and any change of configuration (yaml defaults included) gives a new cell.
A failed cell is stored with its error, shown in the table and retried on the next run; the other
cells carry on. Outputs: ``table.md`` (one table per dataset, best value per column in bold,
mean ± sample std over seeds), ``table.csv`` (same, one row per dataset and model), ``cells.csv``
(one row per cell) and, with ``--latex``, ``table.tex``.
"""
import argparse
import signal
import sys
from pathlib import Path

from recbole_mm.experiments.cells import run_cell
from recbole_mm.experiments.measure import machine_description
from recbole_mm.experiments.store import ResultsStore
from recbole_mm.experiments.summary import summarize
from recbole_mm.experiments.writers import write_cells_csv, write_csv, write_latex, write_markdown


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
