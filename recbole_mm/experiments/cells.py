"""One cell of a table: a (model, dataset, seed) run under the table's shared evaluation settings,
read from the store when it finished before, else trained (in a fresh process by default)."""
import time
from pathlib import Path

import yaml

from recbole_mm.compat import plain_config
from recbole_mm.config import Config
from recbole_mm.experiments.hashing import config_hash, effective_config
from recbole_mm.experiments.measure import machine_description, measured_run, measured_run_in_fresh_process


# What decides how a cell is evaluated. A table compares models only if every cell uses the same
# values, so these come from the shared layers (RecBole's and recbole-mm's overall and dataset yaml,
# --config_files, overrides) and replace what a model's own yaml or a per-model file sets
# (MMESID.yaml's Hit@5/10/20, for instance).
EVALUATION_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "valid_metric_bigger", "metric_decimal_place",
                   "candidate_protocol", "num_candidates", "candidate_seed", "candidate_file")


class _SharedLayersConfig(Config):
    """A model's configuration whose evaluation settings ignore its own yaml files (RecBole's or
    recbole-mm's); their other keys (e.g. loss_type, which the config needs) stay."""

    def _update_internal_config_dict(self, file):
        if Path(file).parent.name != "model":
            return super()._update_internal_config_dict(file)
        with open(file, encoding="utf-8") as handle:
            config_dict = yaml.load(handle.read(), Loader=self.yaml_loader) or {}
        kept = {key: value for key, value in config_dict.items() if key not in EVALUATION_KEYS}
        self.internal_config_dict.update(kept)
        return kept


def shared_evaluation_settings(model, dataset, config_file_list, config_dict, cmd_args):
    config = plain_config(_SharedLayersConfig(model, dataset, config_file_list, config_dict, cmd_args))
    return {key: config[key] for key in EVALUATION_KEYS if key in config}


def run_cell(store, model, dataset, seed, config_file_list, config_dict, cmd_args, isolate=True, timeout=None,
             log=print, model_config_files=(), per_user=False, train=True):
    """Read the cell from the store when it finished before, else train it; return its record.
    ``train=False`` only reads: a cell not in the store comes back with status ``missing``.

    ``config_file_list`` is shared by every cell, ``model_config_files`` is this model's own: the
    evaluation settings (``EVALUATION_KEYS``) always come from the shared layers. ``per_user``: the
    record must also hold the per-user test metrics (a stored cell without them is trained again)."""
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
    if stored and stored.get("status") == "ok" and (not per_user or stored.get("per_user")):
        log(f"[{model} / {dataset} / seed {seed}] finished before: read "
            f"{store.path(model, dataset, seed, record['config_hash'])}")
        return {**stored, "reused": True}
    if not train:
        return {**record, "status": "missing"}
    log(f"[{model} / {dataset} / seed {seed}] training (config {record['config_hash']})")
    start = time.perf_counter()
    if isolate:
        result = measured_run_in_fresh_process(model, dataset, cell_files, cell_config, cmd_args, timeout=timeout,
                                               per_user=per_user)
    else:
        try:
            result = {"status": "ok", **measured_run(model, dataset, cell_files, cell_config, cmd_args,
                                                     per_user=per_user)}
        except Exception as error:
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    if result["status"] == "interrupted":  # not a result: the next run trains this cell
        return {**record, **result}
    record.update(result, model=model, dataset=dataset, seed=seed, wall_seconds=time.perf_counter() - start,
                  machine=machine_description(), finished_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                  peak_memory_scope="own process" if isolate else "whole runner process so far",
                  config=config)
    store.save(record)
    if record["status"] != "ok":
        log(f"[{model} / {dataset} / seed {seed}] FAILED: {record['error']}")
    return {**record, "reused": False}
