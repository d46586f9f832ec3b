"""A converged, tuned, multi-seed leaderboard on one dataset, with paired significance.

    python -m recbole_mm.experiments.leaderboard --spec benchmarks/leaderboard/Scientific.yaml \
        [--output benchmarks/results/leaderboard/Scientific] [--jobs 2] [--models SASRec FMRLRec] [--key=value ...]

The spec (YAML) names the dataset, the models with their tuning spaces, the seeds, the shared
config files (budget, width, early stopping) and the reference model::

    dataset: Scientific
    reference: SASRec
    metric: ndcg@10                  # the significance column's metric (a test metric key)
    seeds: [2020, 2021, 2022]
    max_trials: 4                    # a model's space may not hold more points than this
    tuned_on: Scientific             # optional: each space is one point, the best found on that dataset's
                                     # leaderboard; nothing is tuned on this one (the table says so)
    config_files: [benchmarks/leaderboard/budget.yaml]
    model_config_files: {MMM4Rec: [benchmarks/tables/mmm4rec-64.yaml]}   # a model's own settings
    models:
      SASRec: {learning_rate: [0.001, 0.0003], hidden_dropout_prob: [0.2, 0.5]}
      GRU4Rec: {}                    # no tuning: its defaults
    ablations:                       # optional: a model's best point with one component switched off
      MMM4Rec w/o Time: {of: MMM4Rec, set: {is_time: False}}

For each model: every point of its space is trained with the first seed and judged by its best
validation score (tuning never sees the test set); the best point is then trained with every seed.
The first seed's run of the best point is the same cell as its tuning trial and is reused. An
ablation row trains its model's best point with ``set`` on top, on every seed (not tuned again: it
asks what the component is worth at the tuned point), once that model is tuned; the table compares
it with its full model, paired by user and seed. Every
cell is a table-runner cell (``recbole_mm.experiments.cells``): hashed by its effective config,
stored under ``<output>/cells``, reused on a rerun, so an interrupted leaderboard resumes. Cells
keep their test users' per-user metrics for the paired tests (``significance``). A cell whose run
used every epoch of its cap did not early-stop: it is marked as not converged.

Outputs in ``--output`` (default ``benchmarks/results/leaderboard/<spec file name>``): ``table.md`` / ``table.csv`` (one row per model), ``tuning.csv`` (every
trial), ``<metric>.png`` (test metric per model, mean and sample std over seeds). Tables are
rewritten each time a model finishes; ``--jobs N`` trains N models at once (each cell in its own
process; give each ``OMP_NUM_THREADS`` cores). The tables show every model of the spec whose cells
are stored, so ``--models X`` adds a row without losing the others, and a table built while cells
are still missing says which (``INCOMPLETE: ...``); ``--report`` writes them from the store without
training. One leaderboard run at a time holds ``<output>/.lock``: a second one on the same
``--output`` stops at once instead of training the same cells twice (run models side by side with
``--jobs``, or on another ``--output`` and copy the finished cells into this one's ``cells/``).
"""
import argparse
import csv
import itertools
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from recbole_mm.experiments.cells import run_cell
from recbole_mm.experiments.measure import interrupt_fresh_process_runs, machine_description
from recbole_mm.experiments.significance import compare
from recbole_mm.experiments.store import ResultsStore
from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.atomic import open_atomic, save_figure_atomic, write_text_atomic
from recbole_mm.utils.lock import output_lock

SPEC_KEYS = {"dataset", "reference", "metric", "seeds", "max_trials", "config_files", "model_config_files", "models",
             "description", "tuned_on", "ablations"}


def load_spec(path):
    path = Path(path)
    if not path.is_file():
        raise RecboleMMError(f"leaderboard spec {path} does not exist.")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise RecboleMMError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}.")
    for key in ("dataset", "models", "seeds", "reference", "metric"):
        if not spec.get(key):
            raise RecboleMMError(f"{path}: '{key}' is required (see python -m recbole_mm.experiments.leaderboard -h).")
    spec.setdefault("max_trials", 4)
    spec.setdefault("config_files", [])
    spec.setdefault("model_config_files", {})
    if spec["reference"] not in spec["models"]:
        raise RecboleMMError(f"{path}: reference {spec['reference']!r} is not one of the models {list(spec['models'])}.")
    for model, space in spec["models"].items():
        space = spec["models"][model] = space or {}
        if not isinstance(space, dict) or not all(isinstance(values, list) and values for values in space.values()):
            raise RecboleMMError(f"{path}: models.{model} must map each tuned key to a non-empty list of values.")
        if len(trial_points(space)) > spec["max_trials"]:
            raise RecboleMMError(f"{path}: models.{model} has {len(trial_points(space))} points, more than "
                                 f"max_trials={spec['max_trials']}: every model gets the same tuning budget.")
        if spec.get("tuned_on") and len(trial_points(space)) != 1:
            raise RecboleMMError(f"{path}: models.{model} has {len(trial_points(space))} points, but tuned_on="
                                 f"{spec['tuned_on']!r} says each model trains the one point tuned there: give one "
                                 "value per key, or drop tuned_on to tune on this dataset.")
    spec["ablations"] = spec.get("ablations") or {}
    for name, ablation in spec["ablations"].items():
        if name in spec["models"]:
            raise RecboleMMError(f"{path}: ablation {name!r} has the name of a model; give it its own, e.g. "
                                 f"'{name} w/o X'.")
        if not isinstance(ablation, dict) or set(ablation) != {"of", "set"} or not isinstance(ablation["set"], dict) \
                or not ablation["set"]:
            raise RecboleMMError(f"{path}: ablations.{name} must be {{of: <model>, set: {{<key>: <value>, ...}}}}.")
        if ablation["of"] not in spec["models"]:
            raise RecboleMMError(f"{path}: ablations.{name}.of = {ablation['of']!r} is not one of the models "
                                 f"{list(spec['models'])}.")
    return spec


def trial_points(space):
    """Every combination of the space's values, in a fixed order ({} -> one point: the defaults)."""
    keys = sorted(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[key] for key in keys))]


def is_converged(record):
    if "stopped_early" in record:  # a staged model: did its last stage stop before its epochs ran out
        return record["stopped_early"]
    cap = record.get("epoch_cap")
    return None if cap is None or record.get("epochs") is None else record["epochs"] < cap


def valid_key(record):
    """Sort key: a better validation score is larger (RecBole says which direction is better)."""
    score = record["best_valid_score"]
    return score if record.get("valid_score_bigger", True) else -score


def _cell(store, spec, model, seed, params, config_dict, cmd_args, log, timeout, isolate, train):
    return run_cell(store, model, spec["dataset"], seed, spec["config_files"], {**config_dict, **params}, cmd_args,
                    isolate, timeout=timeout, log=log, model_config_files=spec["model_config_files"].get(model, []),
                    per_user=True, train=train)


def run_model(store, spec, model, config_dict, cmd_args, log, timeout=None, isolate=True, train=True):
    """Tune ``model`` on the first seed's validation score, then train its best point on every seed.
    ``train=False`` reads the store only: None until every tuning trial is stored; seeds not yet
    stored are left out of the finals."""
    run = lambda seed, params: _cell(store, spec, model, seed, params, config_dict, cmd_args, log,  # noqa: E731
                                     timeout, isolate, train)
    trials = []
    for params in trial_points(spec["models"][model]):
        trials.append({"params": params, "record": run(spec["seeds"][0], params)})
    if any(trial["record"]["status"] == "missing" for trial in trials):
        return None
    finished = [trial for trial in trials if trial["record"]["status"] == "ok"]
    if not finished:
        return {"model": model, "trials": trials, "best_params": None, "finals": []}
    best = max(finished, key=lambda trial: valid_key(trial["record"]))
    finals = [best["record"]] + [run(seed, best["params"]) for seed in spec["seeds"][1:]]
    finals = [record for record in finals if record["status"] != "missing"]
    return {"model": model, "trials": trials, "best_params": best["params"], "finals": finals}


def run_ablation(store, spec, name, full, config_dict, cmd_args, log, timeout=None, isolate=True, train=True):
    """The full model's best point (``full``: its outcome) with the ablation's ``set`` on top, every seed.
    ``train=False`` reads the store only: None while no seed is stored."""
    ablation = spec["ablations"][name]
    params = {**full["best_params"], **ablation["set"]}
    finals = [_cell(store, spec, ablation["of"], seed, params, config_dict, cmd_args, log, timeout, isolate, train)
              for seed in spec["seeds"]]
    finals = [record for record in finals if record["status"] != "missing"]
    if not finals and not train:
        return None
    return {"ablation": name, "of": ablation["of"], "set": ablation["set"], "finals": finals}


def ablation_rows(spec, outcomes, ablations):
    """One row per ablation: its test metrics and the paired comparison with its full model."""
    rows = []
    for name, outcome in ablations.items():
        finals = [record for record in outcome["finals"] if record["status"] == "ok"]
        full = [record for record in outcomes[outcome["of"]]["finals"] if record["status"] == "ok"]
        test_keys = sorted({key for record in finals for key in record["test_result"]})
        rows.append({
            "name": name, "of": outcome["of"], "set": outcome["set"], "seeds": [record["seed"] for record in finals],
            "test": {key: mean_std([record["test_result"].get(key) for record in finals]) for key in test_keys},
            "converged": sum(bool(is_converged(record)) for record in finals),
            "epochs": mean_std([record.get("epochs") for record in finals])[0],
            "errors": [record.get("error", "") for record in outcome["finals"] if record["status"] != "ok"],
            "comparison": compare(finals, full, spec["metric"]) if finals and full else None,
        })
    return rows


def mean_std(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def model_rows(spec, outcomes):
    """One summary row per model, with the paired comparison against the reference."""
    reference = outcomes.get(spec["reference"])
    reference_finals = [r for r in (reference or {}).get("finals", []) if r["status"] == "ok"]
    rows = []
    for model in spec["models"]:
        outcome = outcomes.get(model)
        if outcome is None:
            continue
        finals = [record for record in outcome["finals"] if record["status"] == "ok"]
        failed = [record for record in outcome["finals"] + [t["record"] for t in outcome["trials"]]
                  if record["status"] != "ok"]
        test_keys = sorted({key for record in finals for key in record["test_result"]})
        row = {
            "model": model, "trials": len(outcome["trials"]), "best_params": outcome["best_params"],
            "seeds": [record["seed"] for record in finals],
            "valid": mean_std([record["best_valid_score"] for record in finals])[0],
            "test": {key: mean_std([record["test_result"].get(key) for record in finals]) for key in test_keys},
            "converged": sum(bool(is_converged(record)) for record in finals),
            "epochs": mean_std([record.get("epochs") for record in finals])[0],
            "parameters": finals[0].get("parameters") if finals else None,
            "errors": [record.get("error", "") for record in failed],
            "comparison": None,
        }
        if finals and reference_finals and model != spec["reference"]:
            row["comparison"] = compare(finals, reference_finals, spec["metric"])
        rows.append(row)
    return rows


def _fmt(mean, std, decimals=4):
    if mean is None:
        return "—"
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")


def _fmt_p(value):
    return "—" if value is None else (f"{value:.1e}" if value < 1e-3 else f"{value:.3f}")


def write_outputs(output, spec, outcomes, header_lines, ablations=None):
    rows = model_rows(spec, outcomes)
    test_keys = sorted({key for row in rows for key in row["test"]})
    metric, reference = spec["metric"], spec["reference"]
    tuned = f"params (tuned on {spec['tuned_on']})" if spec.get("tuned_on") else "best params (tuned on valid)"
    head = (["model", tuned, "valid score"] + [f"test {key}" for key in test_keys]
            + ["converged", "epochs", "trainable params", f"{metric} vs {reference}", "p (paired t)", "p (Wilcoxon)"])
    lines = [f"# Leaderboard: {spec['dataset']}", "", *([spec["description"], ""] if spec.get("description") else []),
             *header_lines, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with open_atomic(output / "table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "best_params", "seeds", "valid_score"]
                        + [f"test {key} {part}" for key in test_keys for part in ("mean", "std")]
                        + ["converged", "epochs", "parameters", "relative_change", "t_p", "wilcoxon_p", "pairs"])
        for row in rows:
            comparison = row["comparison"] or {}
            change = comparison.get("relative_change")
            cells = [row["model"], ", ".join(f"{k}={v}" for k, v in (row["best_params"] or {}).items()) or "defaults",
                     _fmt(row["valid"], None)]
            cells += [_fmt(*row["test"].get(key, (None, None))) for key in test_keys]
            cells += [f"{row['converged']}/{len(row['seeds'])}", _fmt(row["epochs"], None, 1),
                      f"{row['parameters']:,}" if row["parameters"] else "—",
                      "reference" if row["model"] == reference else ("—" if change is None else f"{change:+.1%}"),
                      _fmt_p(comparison.get("t_p")), _fmt_p(comparison.get("wilcoxon_p"))]
            lines.append("| " + " | ".join(cells) + " |")
            writer.writerow([row["model"], yaml.safe_dump(row["best_params"], default_flow_style=True).strip(),
                             " ".join(map(str, row["seeds"])), row["valid"]]
                            + [value for key in test_keys for value in row["test"].get(key, (None, None))]
                            + [row["converged"], row["epochs"], row["parameters"], change,
                               comparison.get("t_p"), comparison.get("wilcoxon_p"), comparison.get("n")])
    failures = [f"- {row['model']}: {error[:200]}" for row in rows for error in row["errors"]]
    if ablations:
        extra = ablation_rows(spec, outcomes, ablations)
        lines += _ablation_lines(spec, extra)
        failures += [f"- {row['name']}: {error[:200]}" for row in extra for error in row["errors"]]
        with open_atomic(output / "ablations.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ablation", "of", "set", "seeds", f"test {metric} mean", f"test {metric} std", "converged",
                             "epochs", "relative_change", "t_p", "wilcoxon_p", "pairs"])
            for row in extra:
                comparison = row["comparison"] or {}
                writer.writerow([row["name"], row["of"], yaml.safe_dump(row["set"], default_flow_style=True).strip(),
                                 " ".join(map(str, row["seeds"])), *row["test"].get(metric, (None, None)),
                                 row["converged"], row["epochs"], comparison.get("relative_change"),
                                 comparison.get("t_p"), comparison.get("wilcoxon_p"), comparison.get("n")])
    if failures:
        lines += ["", "Failed cells (retried on the next run):", *failures]
    write_text_atomic(output / "table.md", "\n".join(lines) + "\n")
    with open_atomic(output / "tuning.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "params", "status", "valid_score", "epochs", "epoch_cap", "converged", "config_hash"])
        for model, outcome in outcomes.items():
            for trial in outcome["trials"]:
                record = trial["record"]
                writer.writerow([model, yaml.safe_dump(trial["params"], default_flow_style=True).strip(),
                                 record["status"], record.get("best_valid_score"), record.get("epochs"),
                                 record.get("epoch_cap"), is_converged(record), record.get("config_hash")])
    plot(output / f"{metric.replace('@', '_at_')}.png", spec, rows, f"test {metric}")


def _ablation_lines(spec, rows):
    metric = spec["metric"]
    lines = ["", "## Ablations", "",
             f"Each row trains its full model's best point with the switch on top, on every seed (not tuned again); "
             f"{metric} per test user against the full model, paired by user and seed, pooled over seeds.", "",
             f"| ablation | of | set | test {metric} | converged | epochs | {metric} vs full model | p (paired t) | "
             "p (Wilcoxon) |", "|" + "---|" * 9]
    for row in rows:
        comparison = row["comparison"] or {}
        change = comparison.get("relative_change")
        lines.append("| " + " | ".join([
            row["name"], row["of"], ", ".join(f"{k}={v}" for k, v in row["set"].items()),
            _fmt(*row["test"].get(metric, (None, None))), f"{row['converged']}/{len(row['seeds'])}",
            _fmt(row["epochs"], None, 1), "—" if change is None else f"{change:+.1%}",
            _fmt_p(comparison.get("t_p")), _fmt_p(comparison.get("wilcoxon_p"))]) + " |")
    return lines


def plot(path, spec, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec["metric"]
    shown = [row for row in rows if metric in row["test"] and row["test"][metric][0] is not None]
    if not shown:
        return
    figure, axis = plt.subplots(figsize=(1.2 * len(shown) + 2, 3.5))
    means = [row["test"][metric][0] for row in shown]
    stds = [row["test"][metric][1] or 0 for row in shown]
    colors = ["0.6" if row["model"] == spec["reference"] else "C0" for row in shown]
    axis.bar([row["model"] for row in shown], means, yerr=stds, capsize=4, color=colors)
    axis.set_ylabel(title)
    axis.set_title(f"{spec['dataset']}: {title} (mean ± std over seeds; grey = reference)")
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=120)
    plt.close(figure)


def run_leaderboard(spec, output, models=None, config_dict=None, cmd_args=(), jobs=1, timeout=None, log=print,
                    isolate=True, train=True):
    """Tune and train every model of the spec (or ``models``); write the outputs; return per-model outcomes.

    The tables always show every model of the spec that has its cells in the store, trained by this
    run or an earlier one, so ``--models X`` adds X's row without dropping the others.
    ``train=False`` (``--report``) trains nothing: it writes the tables from the store.
    ``isolate=False`` trains in this process (tests; peak memory is then not the cell's own)."""
    output = Path(output)
    selected = list(models or [*spec["models"], *spec["ablations"]]) if train else []
    missing = [name for name in selected if name not in spec["models"] and name not in spec["ablations"]]
    if missing:
        raise RecboleMMError(f"--models {missing} are not in the spec's models {list(spec['models'])} or ablations "
                             f"{list(spec['ablations'])}.")
    models = [name for name in selected if name in spec["models"]]
    ablations_to_train = [name for name in selected if name in spec["ablations"]]
    config_dict = {"checkpoint_dir": str(Path("saved") / "leaderboard" / spec["dataset"]), "show_progress": False,
                   **(config_dict or {})}
    tuning = (f"each model trains the point tuned on {spec['tuned_on']}'s leaderboard (its best validation point there; "
              "nothing tuned under this spec; a model that leaderboard did not tune runs its defaults) on every seed"
              if spec.get("tuned_on") else
              f"each model tuned over at most {spec['max_trials']} points on seed {spec['seeds'][0]}'s validation "
              "score, then its best point trained on every seed")
    header = [f"Seeds: {', '.join(map(str, spec['seeds']))}; {tuning}; test metrics "
              f"of the best-validation checkpoint, mean ± sample std over seeds. Significance: {spec['metric']} per "
              f"test user against {spec['reference']}, paired by user and seed, pooled over seeds.",
              f"Config files: {' '.join(spec['config_files']) or 'none'}; overrides: {' '.join(cmd_args) or 'none'}. "
              "converged = runs that early-stopped before their epoch cap (a model trained in stages: its last stage)."]
    with output_lock(output, "a leaderboard run"):
        store = ResultsStore(output)
        outcomes = {}
        for model in spec["models"]:
            if model not in models:
                stored = run_model(store, spec, model, config_dict, cmd_args, lambda message: None, train=False)
                if stored is not None:
                    outcomes[model] = stored
        ablations = {}
        for name, ablation in spec["ablations"].items():
            if name not in ablations_to_train and outcomes.get(ablation["of"], {}).get("finals"):
                stored = run_ablation(store, spec, name, outcomes[ablation["of"]], config_dict, cmd_args,
                                      lambda message: None, train=False)
                if stored is not None:
                    ablations[name] = stored

        def write(trained):
            ordered = {model: outcomes[model] for model in spec["models"] if model in outcomes}
            ordered_ablations = {name: ablations[name] for name in spec["ablations"] if name in ablations}
            machines = (f"Machine: {machine_description()}." if train else
                        f"Machines (as each cell recorded them): {_machines(ordered)}.")
            write_outputs(output, spec, ordered, [machines, *header, f"Written {time.strftime('%Y-%m-%d %H:%M')}. "
                                                  f"{_completeness(spec, ordered, ordered_ablations)}"],
                          ordered_ablations)
            log(f"[leaderboard] {trained} done; wrote {output / 'table.md'}")

        def ablate(name, model_futures):
            of = spec["ablations"][name]["of"]
            full = model_futures[of].result() if of in model_futures else outcomes.get(of)
            if not full or not full["finals"]:
                raise RecboleMMError(f"ablation {name!r} trains {of}'s best point, and {of} has no finished run in "
                                     f"{output}: run --models {of} first (or both together).")
            return run_ablation(store, spec, name, full, config_dict, cmd_args, log, timeout, isolate)

        if not models and not ablations_to_train:
            write("report from the store")
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            # models are queued first, so an ablation never waits on a full model that has not started
            model_futures = {model: pool.submit(run_model, store, spec, model, config_dict, cmd_args, log, timeout,
                                                isolate) for model in models}
            futures = {future: (model, outcomes) for model, future in model_futures.items()}
            futures.update({pool.submit(ablate, name, model_futures): (name, ablations) for name in ablations_to_train})
            for future in as_completed(futures):
                name, table = futures[future]
                table[name] = future.result()
                write(name)
    if not train:
        return {**outcomes, **ablations}
    return {name: (outcomes if name in outcomes else ablations)[name] for name in models + ablations_to_train}


def _machines(outcomes):
    return "; ".join(sorted({record.get("machine", "not recorded").split(", load average")[0]
                             for outcome in outcomes.values() for record in outcome["finals"]})) or "none"


def _completeness(spec, outcomes, ablations=None):
    """Which rows are short of the spec: a table built while cells are still missing says so."""
    ablations = ablations or {}
    absent = [model for model in spec["models"] if model not in outcomes]
    not_ablated = [name for name in spec["ablations"] if name not in ablations]
    short = [f"{model} ({len(outcome['finals'])} of {len(spec['seeds'])} seeds)"
             for model, outcome in {**outcomes, **ablations}.items() if len(outcome["finals"]) < len(spec["seeds"])]
    if not absent and not not_ablated and not short:
        return "Complete: every model and ablation of the spec on every seed."
    return ("INCOMPLETE: " + "; ".join(part for part in (
        f"not run yet: {', '.join(absent)}" if absent else "",
        f"ablations not run yet: {', '.join(not_ablated)}" if not_ablated else "",
        f"seeds still missing: {', '.join(short)}" if short else "") if part) + ".")


def _exit_on_sigterm(signum, frame):
    # the cells train in worker threads, which a signal does not unwind: kill their processes here
    interrupt_fresh_process_runs()
    raise SystemExit(128 + signum)


def main(argv=None):
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.experiments.leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--spec", required=True, help="leaderboard spec (YAML)")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/leaderboard/<spec file name without .yaml>")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the spec's models")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the tables from the cells already in the store")
    args, overrides = parser.parse_known_args(argv)
    try:
        spec = load_spec(args.spec)
        # named after the spec, not its dataset: two specs of one dataset (full ranking, candidates) keep apart
        output = args.output or Path("benchmarks") / "results" / "leaderboard" / Path(args.spec).stem
        outcomes = run_leaderboard(spec, output, args.models, cmd_args=overrides, jobs=args.jobs, timeout=args.timeout,
                                   train=not args.report)
    except RecboleMMError as error:
        print(f"recbole-mm: error: {error}", file=sys.stderr)
        return 2
    failed = [model for model, outcome in outcomes.items() if not any(r["status"] == "ok" for r in outcome["finals"])]
    if failed:
        print(f"recbole-mm: no finished run for {failed} (see {output}/table.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
