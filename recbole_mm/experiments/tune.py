"""Hyperparameter tuning of any recbole-mm or RecBole model with RecBole's ``HyperTuning`` (hyperopt).

    python -m recbole_mm.experiments.tune --model=MMSASRec --dataset=Scientific --params_file=hyper.test \
        [--algo=exhaustive|random|bayes] [--max_evals=N] [--early_stop=10] [--tune_seed=2020] \
        [--config_files="a.yaml b.yaml"] [--output=tuning/MMSASRec-Scientific] [--key=value ...]

``exhaustive`` visits the grid of ``choice`` parameters in a fixed order; ``random`` and
``bayes`` (TPE) sample hyperopt's space with ``--tune_seed``. ``--params_file`` is RecBole's
format, one parameter a line: ``name choice [v1,v2]``, ``name uniform low,high``,
``name quniform low,high,q``, ``name loguniform low,high``. Every trial trains and tests through
``recbole_mm.quick_start`` (via ``recbole_mm.experiments.measure``), so recbole-mm models, the feature hook and
the safe trainer are used; ``--key=value`` fixes any other setting for all trials. RecBole's own
objective function would import ray and only find RecBole's models.

Outputs in ``--output``: ``trials.json`` (every trial: parameters, valid/test results, seconds per
epoch, epochs to best, status; rewritten after each trial) and ``best.json`` (the best parameters
and their results). Resuming: rerunning the same command replays the search with the same seed;
trials already in ``trials.json`` are read instead of trained, so an interrupted run continues
where it stopped (a larger ``--max_evals`` extends it). Failed trials are recorded and retried on
the next run. ``trials.json`` remembers the search setup; a different setup in the same output
folder is an error rather than a silent mix.

``--ray`` runs the same trials under Ray Tune instead (optional; see ``run_with_ray``).
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from recbole.trainer.hyper_tuning import HyperTuning, _parameters  # hyperopt only: no ray import

from recbole_mm.experiments.hashing import config_hash, effective_config
from recbole_mm.experiments.measure import measured_run
from recbole_mm.utils import RecboleMMError

ALGORITHMS = ("exhaustive", "random", "bayes")


def params_key(params):
    return json.dumps(params, sort_keys=True, default=str)


class TrialStore:
    """``trials.json``: the search setup and every trial's record, in the order they ran."""

    def __init__(self, output, setup):
        self.path = Path(output) / "trials.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.setup = setup
        self.trials = []
        if self.path.is_file():
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored["setup"] != setup:
                changed = sorted(key for key in set(setup) | set(stored["setup"])
                                 if setup.get(key) != stored["setup"].get(key))
                raise RecboleMMError(
                    f"{self.path} holds trials of a different search (differs in: {', '.join(changed)}). "
                    "Choose another --output, or delete that file to start this search from scratch."
                )
            self.trials = stored["trials"]

    def finished(self, params):
        key = params_key(params)
        return next((t for t in self.trials if t["params_key"] == key and t["status"] == "ok"), None)

    def add(self, record):
        key = record["params_key"]
        self.trials = [t for t in self.trials if t["params_key"] != key] + [record]
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"setup": self.setup, "trials": self.trials}, indent=1, default=str),
                           encoding="utf-8")
        os.replace(partial, self.path)  # atomic: an interrupted run never leaves half a file


def recbole_mm_objective(model, dataset, store, cmd_args=()):
    """An objective function with the signature RecBole's ``HyperTuning`` calls,
    ``(config_dict, config_file_list) -> result dict``, training through recbole-mm; finished
    trials are read from ``store``."""

    def objective(config_dict, config_file_list=None):
        finished = store.finished(config_dict)
        if finished:
            return {**finished, "reused": True}
        start = time.perf_counter()
        try:
            result = {"status": "ok", **measured_run(model, dataset, config_file_list, config_dict, cmd_args)}
        except Exception as error:
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        record = {"params": config_dict, "params_key": params_key(config_dict), **result,
                  "wall_seconds": time.perf_counter() - start, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        store.add(record)
        return {**record, "reused": False}

    return objective


def grid_search(new_ids, domain, trials, seed):
    """A hyperopt algorithm visiting the grid of ``choice`` parameters in a fixed order, each point
    once. Replaces RecBole's ``exhaustive_search``, which hands hyperopt >= 0.2.7 a
    ``np.random.RandomState`` where it needs a ``Generator`` (AttributeError: 'integers')."""
    from hyperopt.base import miscs_update_idxs_vals

    grid = _parameters(domain.expr)
    names = sorted(grid)
    seen = {tuple(sorted((name, int(values[0])) for name, values in trial["misc"]["vals"].items()))
            for trial in trials.trials}
    unseen = (point for point in (tuple(zip(names, map(int, combo)))
                                  for combo in itertools.product(*(grid[name] for name in names)))
              if point not in seen)
    docs = []
    for new_id, point in zip(new_ids, unseen):
        misc = dict(tid=new_id, cmd=domain.cmd, workdir=domain.workdir)
        miscs_update_idxs_vals([misc], {name: [new_id] for name in names}, {name: [index] for name, index in point})
        docs += trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc])
    return docs  # empty once the grid is done: hyperopt then stops


class RecboleMMHyperTuning(HyperTuning):
    """RecBole's ``HyperTuning`` with: a seeded, replayable search (so a rerun can read finished
    trials), failed trials recorded instead of aborting the search, ``max_evals`` also capping
    exhaustive search, and the best score compared correctly when it is 0 (RecBole tests
    ``if not self.best_score``)."""

    def __init__(self, objective_function, params_file, fixed_config_file_list=None, algo="exhaustive",
                 max_evals=100, early_stop=10, seed=2020, log=print):
        if algo not in ALGORITHMS:
            raise RecboleMMError(f"--algo={algo} is not known; choose one of {', '.join(ALGORITHMS)}.")
        super().__init__(objective_function, params_file=params_file, fixed_config_file_list=fixed_config_file_list,
                         algo=algo, max_evals=max_evals, early_stop=early_stop)
        if algo == "exhaustive":
            not_choice = sorted(set(self.space) - set(_parameters(self.space)))
            if not_choice:
                raise RecboleMMError(f"exhaustive search needs 'choice' parameters; {', '.join(not_choice)} "
                                     f"in {params_file} are not. Use --algo=random or --algo=bayes.")
            self.algo = grid_search
            self.max_evals = min(self.max_evals, max_evals) if max_evals else self.max_evals
        self.seed = seed
        self.log = log
        self.results = []

    def trial(self, params):
        import hyperopt

        result = self.objective_function(dict(params), self.fixed_config_file_list)
        self.results.append(result)
        source = "read from trials.json" if result["reused"] else f"{result['wall_seconds']:.0f} s"
        if result["status"] != "ok":
            self.log(f"trial {len(self.results)} {params}: FAILED ({result['error']}); retried on the next run")
            return {"loss": None, "status": hyperopt.STATUS_FAIL}
        score, bigger = result["best_valid_score"], result["valid_score_bigger"]
        self.log(f"trial {len(self.results)} {params}: valid score {score:.4f} ({source})")
        if self.best_score is None or (score > self.best_score if bigger else score < self.best_score):
            self.best_score, self.best_params, self.best_test_result = score, dict(params), result["test_result"]
        self.params2result[self.params2str(params)] = result
        self.model = result["model"]
        return {"loss": -score if bigger else score, "status": hyperopt.STATUS_OK}

    def run(self):
        from hyperopt import Trials, fmin

        fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals, early_stop_fn=self.early_stop_fn,
             trials=Trials(), rstate=np.random.default_rng(self.seed), show_progressbar=False)


def search_setup(model, dataset, params_file, algo, seed, config_file_list, cmd_args):
    """What makes two runs the same search (so their trials can be shared)."""
    fixed = effective_config(model, dataset, config_file_list, None, cmd_args)
    return {"model": fixed["model"], "dataset": dataset, "algo": algo, "tune_seed": seed,
            "space_sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest()[:12],
            "fixed_config_hash": config_hash(fixed)}


def check_overrides(params_file, cmd_args):
    tuned = {line.split()[0] for line in Path(params_file).read_text().splitlines() if len(line.split()) >= 3}
    fixed = {arg[2:].split("=", 1)[0] for arg in cmd_args}
    both = sorted(tuned & fixed)
    if both:
        raise RecboleMMError(f"{', '.join('--' + k for k in both)} given on the command line but tuned in "
                             f"{params_file}: the command line would override every trial's value. Drop one.")


def tune(model, dataset, params_file, algo="exhaustive", max_evals=100, early_stop=10, seed=2020,
         config_file_list=None, cmd_args=(), output=None, log=print):
    """Run the search; write ``trials.json`` and ``best.json`` to ``output``; return the best record."""
    if not Path(params_file).is_file():
        raise RecboleMMError(f"params file {params_file} not found (RecBole format: 'name choice [a,b]' per line).")
    check_overrides(params_file, cmd_args)
    output = Path(output or f"tuning/{model}-{dataset}")
    cmd_args = list(cmd_args)
    if not any(arg.startswith("--checkpoint_dir=") for arg in cmd_args):
        cmd_args.append(f"--checkpoint_dir={output / 'checkpoints'}")
    setup = search_setup(model, dataset, params_file, algo, seed, config_file_list, cmd_args)
    store = TrialStore(output, setup)
    tuning = RecboleMMHyperTuning(recbole_mm_objective(model, dataset, store, cmd_args), params_file,
                                  config_file_list, algo, max_evals, early_stop, seed, log)
    tuning.run()
    if tuning.best_params is None:
        raise RecboleMMError(f"every trial failed; see the errors in {store.path}")
    best = store.finished(tuning.best_params)
    summary = {"best_params": tuning.best_params, "best_valid_score": best["best_valid_score"],
               "best_valid_result": best["best_valid_result"], "test_result": best["test_result"],
               "trials": len(tuning.results), "failed": sum(r["status"] != "ok" for r in tuning.results),
               "read_from_trials_json": sum(r["reused"] for r in tuning.results), "setup": setup}
    (output / "best.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    log(f"best {tuning.best_params}: valid {best['best_valid_score']:.4f}, test {best['test_result']}; "
        f"wrote {store.path} and {output / 'best.json'}")
    return summary


def run_with_ray(model, dataset, params_file, algo="exhaustive", max_evals=100, seed=2020, config_file_list=None,
                 cmd_args=(), output=None, address=None, cpus_per_trial=1, gpus_per_trial=0, log=print):
    """The same search under Ray Tune: trials run in parallel on a local or existing Ray cluster
    (``address='auto'`` after ``ray start --head`` / ``ray start --address=<head>:6379`` on each node).

    ``exhaustive``: a Ray grid over the ``choice`` parameters; ``random`` / ``bayes``: Ray's
    ``HyperOptSearch`` over the same hyperopt space (all points random / TPE after 20 random ones).
    Results: ``<output>/ray`` (Ray's experiment folder: rerunning the command restores it and runs
    only unfinished trials), ``trials.json`` and ``best.json`` like the hyperopt path. Every node must
    see the dataset and ``<output>`` at the same paths (shared file system).
    """
    try:
        import ray
        from ray import tune as ray_tune
        from ray.air import RunConfig, session
        from ray.tune.search.hyperopt import HyperOptSearch
        import pyarrow  # noqa: F401  (Ray Tune 2.6 reads its experiment folder through pyarrow)
    except Exception as error:  # ray is optional; ray 2.6 also fails to import without pkg_resources
        raise RecboleMMError(
            f"--ray needs Ray Tune, which does not import here ({type(error).__name__}: {error}). "
            "Install it with pip install 'ray[tune]'; RecBole's ray 2.6.3 instead needs "
            "pip install 'setuptools<81' pyarrow (it imports pkg_resources; Tune reads results through "
            "pyarrow). Without --ray the same search runs "
            "with hyperopt in this process."
        ) from error
    if algo not in ALGORITHMS:
        raise RecboleMMError(f"--algo={algo} is not known; choose one of {', '.join(ALGORITHMS)}.")
    check_overrides(params_file, cmd_args)
    output = Path(output or f"tuning/{model}-{dataset}").resolve()
    cmd_args = list(cmd_args)
    if not any(arg.startswith("--checkpoint_dir=") for arg in cmd_args):
        cmd_args.append(f"--checkpoint_dir={output / 'checkpoints'}")
    fixed = effective_config(model, dataset, config_file_list, None, cmd_args)
    mode = "max" if fixed["valid_metric_bigger"] else "min"
    space = HyperTuning._build_space_from_file(params_file)
    if algo == "exhaustive":
        choices = {}
        for line in Path(params_file).read_text().splitlines():
            parts = line.strip().split(" ")
            if len(parts) >= 3:
                if parts[1] != "choice":
                    raise RecboleMMError(f"exhaustive search takes 'choice' parameters only; {parts[0]} is {parts[1]}.")
                choices[parts[0]] = ray_tune.grid_search(eval("".join(parts[2:])))
        param_space, search_alg, num_samples = choices, None, 1
    else:
        param_space, num_samples = None, max_evals
        search_alg = HyperOptSearch(space, metric="valid_score", mode=mode, random_state_seed=seed,
                                    n_initial_points=max_evals if algo == "random" else 20)
    workdir = os.getcwd()

    def trainable(params):
        os.chdir(workdir)  # Ray starts each trial in its own folder; data and config paths are relative to ours
        result = measured_run(model, dataset, config_file_list, dict(params), cmd_args)
        session.report({"valid_score": result["best_valid_score"],
                        **{f"valid {k}": v for k, v in result["best_valid_result"].items()},
                        **{f"test {k}": v for k, v in result["test_result"].items()},
                        "seconds_per_epoch": result["seconds_per_epoch"], "epochs_to_best": result["epochs_to_best"]})

    if not ray.is_initialized():
        ray.init(address=address)
    trainable = ray_tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    experiment = output / "ray"
    if (experiment / "tuner.pkl").is_file():  # Tuner.can_restore would need pyarrow even for local folders
        log(f"restoring the Ray experiment in {experiment}: finished trials are kept")
        tuner = ray_tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        tuner = ray_tune.Tuner(trainable, param_space=param_space,
                               tune_config=ray_tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                                               metric="valid_score", mode=mode),
                               run_config=RunConfig(name="ray", local_dir=str(output)))  # storage_path needs pyarrow
    grid = tuner.fit()
    trials = [{"params": r.config, "status": "failed" if r.error else "ok",
               "error": str(r.error) if r.error else None, "metrics": r.metrics} for r in grid]
    (output / "trials.json").write_text(json.dumps({"setup": {"model": model, "dataset": dataset, "algo": algo,
                                                              "ray": True}, "trials": trials}, indent=1, default=str))
    best = grid.get_best_result(metric="valid_score", mode=mode)
    summary = {"best_params": best.config, "best_valid_score": best.metrics["valid_score"],
               "metrics": best.metrics, "trials": len(trials), "failed": sum(t["status"] != "ok" for t in trials)}
    (output / "best.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    log(f"best {best.config}: valid {best.metrics['valid_score']:.4f}; wrote {output / 'trials.json'} and best.json")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.experiments.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params_file", required=True)
    parser.add_argument("--algo", default="exhaustive", choices=ALGORITHMS)
    parser.add_argument("--max_evals", type=int, default=100, help="trials at most (exhaustive: also the grid size)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without progress")
    parser.add_argument("--tune_seed", type=int, default=2020, help="seed of the search itself")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--output", default=None,
                        help="folder for trials.json/best.json (default tuning/<model>-<dataset>)")
    parser.add_argument("--ray", action="store_true", help="run the trials under Ray Tune (optional dependency)")
    parser.add_argument("--ray_address", default=None,
                        help="an existing Ray cluster ('auto'); default: start a local one")
    parser.add_argument("--cpus_per_trial", type=float, default=1)
    parser.add_argument("--gpus_per_trial", type=float, default=0)
    args, overrides = parser.parse_known_args(argv)
    config_files = args.config_files.split() if args.config_files else None
    try:
        if args.ray:
            run_with_ray(args.model, args.dataset, args.params_file, args.algo, args.max_evals, args.tune_seed,
                         config_files, overrides, args.output, args.ray_address, args.cpus_per_trial,
                         args.gpus_per_trial)
        else:
            tune(args.model, args.dataset, args.params_file, args.algo, args.max_evals, args.early_stop,
                 args.tune_seed, config_files, overrides, args.output)
    except RecboleMMError as error:
        print(f"recbole-mm tune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
