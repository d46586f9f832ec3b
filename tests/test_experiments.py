"""Side-by-side table runner and tuning, end to end on a tiny Scientific slice (1 epoch, hidden 16)."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from recbole_mm.experiments.table import main as experiments_main
from recbole_mm.experiments.summary import summarize
from recbole_mm.experiments.table import run_table
from recbole_mm.experiments.writers import write_markdown
from recbole_mm.experiments.hashing import config_hash, dataset_fingerprint, effective_config
from recbole_mm.experiments.tune import tune
from tests.conftest import import_extra, scientific_slice_config, write_scientific_slice


@pytest.fixture
def slice_config(scientific_dir, tmp_path):
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=120)
    return scientific_slice_config(tmp_path / "data")


def test_table_runs_cells_reports_failures_and_reuses_finished_cells(slice_config, tmp_path, in_tmp_cwd):
    bad_gru = tmp_path / "bad_gru.yaml"
    bad_gru.write_text("loss_type: XYZ\ntrain_neg_sample_args: ~\n")  # GRU4Rec raises in its constructor, in the cell's process
    own_metrics = tmp_path / "own_metrics.yaml"  # a model's own evaluation settings: the table's win
    own_metrics.write_text("metrics: [Hit]\ntopk: [5]\nvalid_metric: Hit@5\nhidden_dropout_prob: 0.3\n")
    output = tmp_path / "results"
    arguments = dict(models=["SASRec", "MMSASRec", "GRU4Rec"], datasets=["SciSlice"],
                     config_dict=slice_config, output=output, latex=True,
                     model_config_files={"GRU4Rec": [str(bad_gru)], "MMSASRec": [str(own_metrics)]})
    log = []
    first = {record["model"]: record for record in run_table(**arguments, log=log.append)}

    assert first["SASRec"]["status"] == first["MMSASRec"]["status"] == "ok"
    assert first["GRU4Rec"]["status"] == "failed" and "loss_type" in first["GRU4Rec"]["error"]
    for model in ("SASRec", "MMSASRec"):
        record = first[model]
        assert set(record["test_result"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
        assert record["epochs"] == 1 and record["epochs_to_best"] == 1 and record["seconds_per_epoch"] > 0
        assert record["parameters"] > 0 and record["peak_rss_mib"] > 100
        assert record["config"]["hidden_size"] == 16 and record["config"]["seed"] == 2020
    assert first["SASRec"]["config_hash"] != first["MMSASRec"]["config_hash"]
    assert first["MMSASRec"]["config"]["hidden_dropout_prob"] == 0.3  # the rest of a per-model file applies
    assert first["MMSASRec"]["config"]["valid_metric"] == "NDCG@10"
    assert any("MMSASRec" in line and "metrics ['Hit'] -> ['Recall', 'NDCG']" in line for line in log)

    table = (output / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "failed" in rows["GRU4Rec"] and "loss_type" in rows["GRU4Rec"]
    header = [cell.strip() for cell in rows["model"].strip("|").split("|")]
    ndcg_column = header.index("test ndcg@10")
    best_ndcg = max(first[m]["test_result"]["ndcg@10"] for m in ("SASRec", "MMSASRec"))
    for model in ("SASRec", "MMSASRec"):  # the best in bold, every one of them on a tie
        is_best = first[model]["test_result"]["ndcg@10"] == best_ndcg
        assert rows[model].strip("|").split("|")[ndcg_column].strip().startswith("**") == is_best, model
    with open(output / "table.csv") as file:
        csv_rows = {row["model"]: row for row in csv.DictReader(file)}
    assert float(csv_rows["MMSASRec"]["test recall@10 mean"]) == first["MMSASRec"]["test_result"]["recall@10"]
    assert csv_rows["GRU4Rec"]["failed"] and not csv_rows["SASRec"]["failed"]
    assert "\\textbf{" in (output / "table.tex").read_text()
    with open(output / "cells.csv") as file:
        cells_header = next(csv.reader(file))
    assert len(cells_header) == len(set(cells_header)) and "wall_seconds" in cells_header
    assert "| wall s |" in table

    stored = {path.name: path.stat().st_mtime_ns for path in (output / "cells").glob("*.json")}
    # in this process this time: the GRU4Rec retry fails fast and the in-process path is covered too
    second = {record["model"]: record for record in run_table(**arguments, isolate=False)}
    assert second["SASRec"]["reused"] and second["MMSASRec"]["reused"]
    assert second["MMSASRec"]["test_result"] == first["MMSASRec"]["test_result"]
    assert not second["GRU4Rec"]["reused"] and second["GRU4Rec"]["status"] == "failed"  # failures are retried
    for name, mtime in stored.items():
        if name.startswith(("SASRec", "MMSASRec")):
            assert (output / "cells" / name).stat().st_mtime_ns == mtime

    # a changed setting (here a yaml default seen through the effective config) is a different cell
    changed = effective_config("SASRec", "SciSlice", None, {**slice_config, "checkpoint_dir": "elsewhere",
                                                            "seed": 2020, "show_progress": False, "inner_size": 64})
    moved = effective_config("SASRec", "SciSlice", None, {**slice_config, "checkpoint_dir": "elsewhere",
                                                          "seed": 2020, "show_progress": False})
    assert config_hash(changed) != first["SASRec"]["config_hash"] == config_hash(moved)


def test_cell_hash_follows_the_dataset_files_not_their_folder(scientific_dir, tmp_path):
    original = scientific_slice_config(tmp_path / "a")
    write_scientific_slice(scientific_dir, tmp_path / "a", n_users=30)
    write_scientific_slice(scientific_dir, tmp_path / "b", n_users=30)  # same files, another folder
    write_scientific_slice(scientific_dir, tmp_path / "c", n_users=31)  # same name, other interactions

    def hash_for(root):
        return config_hash(effective_config("SASRec", "SciSlice", None, {**original, "data_path": str(root)}))

    assert hash_for(tmp_path / "a") == hash_for(tmp_path / "b")
    assert hash_for(tmp_path / "c") != hash_for(tmp_path / "a")


def test_dataset_fingerprint_covers_feature_files_outside_the_top_level(tmp_path):
    import hashlib
    folder, elsewhere = tmp_path / "D", tmp_path / "elsewhere"
    (folder / "features").mkdir(parents=True)
    elsewhere.mkdir()
    files = {folder / "D.inter": b"inter", folder / "D.text.npy": b"top", folder / "D.manifest.json": b"when",
             folder / "features" / "image.npy": b"sub", folder / "features" / "image.mask.npy": b"mask",
             elsewhere / "audio.npy": b"far"}
    for path, content in files.items():
        path.write_bytes(content)
    config = {"dataset": "D", "data_path": str(folder), "feature_tables": {
        "text": "D.text.npy", "image": {"path": "features/image.npy", "mask": "features/image.mask.npy"},
        "audio": {"path": str(elsewhere / "audio.npy")}}}
    sha = lambda content: hashlib.sha256(content).hexdigest()  # noqa: E731
    assert dataset_fingerprint(config) == {
        "D.inter": sha(b"inter"), "D.text.npy": sha(b"top"),  # top-level files once, under their names
        "feature_tables.image": sha(b"sub"), "feature_tables.image.mask": sha(b"mask"),
        "feature_tables.audio": sha(b"far")}  # not the manifest: no run reads it
    (folder / "features" / "image.mask.npy").write_bytes(b"other mask")  # a changed subfolder file is new data
    assert dataset_fingerprint(config)["feature_tables.image.mask"] == sha(b"other mask")


def _spawned_children(pid):
    # every thread's children: the leaderboard spawns its cells from worker threads
    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
# SIGKILL: no handler runs (as for a SIGTERM to a script that calls run_leaderboard itself); the kernel
# must take the cell down with the runner
@pytest.mark.parametrize("command, signum", [("table", signal.SIGTERM), ("leaderboard", signal.SIGTERM),
                                             ("leaderboard", signal.SIGKILL)])
def test_stopping_the_runner_stops_the_cell_it_is_training(slice_config, tmp_path, in_tmp_cwd, command, signum):
    config_file = tmp_path / "endless.yaml"
    config_file.write_text(yaml.safe_dump({**slice_config, "epochs": 100000, "stopping_step": 100000}))
    if command == "table":
        arguments = ["recbole_mm.experiments", "table", "--models", "SASRec", "--datasets", "SciSlice",
                     "--config_files", str(config_file)]
    else:  # its cells train in worker threads, which the signal does not reach
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"dataset": "SciSlice", "reference": "SASRec", "metric": "ndcg@10",
                                        "seeds": [2020, 2021], "config_files": [str(config_file)],
                                        "models": {"SASRec": {}}}))
        arguments = ["recbole_mm.experiments.leaderboard", "--spec", str(spec)]
    runner = subprocess.Popen([sys.executable, "-m", *arguments, "--output", str(tmp_path / "out")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = []
    try:
        deadline = time.monotonic() + 120
        while not cells and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.5)
            cells = _spawned_children(runner.pid)
        assert cells, "the runner never started the cell's process"
        runner.send_signal(signum)
        assert runner.wait(timeout=60) == (128 + signum if signum == signal.SIGTERM else -signum)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{cells[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{cells[0]}").exists(), "the cell's process outlived the runner"
        assert not list((tmp_path / "out" / "cells").glob("*.json"))  # an interrupted cell is no result
    finally:
        runner.kill()
        for pid in cells:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def record(model, seed, ndcg, seconds, status="ok"):
    if status != "ok":
        return {"model": model, "dataset": "D", "seed": seed, "status": status, "error": "boom"}
    return {"model": model, "dataset": "D", "seed": seed, "status": "ok", "test_result": {"ndcg@10": ndcg},
            "parameters": 100, "seconds_per_epoch": seconds, "epochs_to_best": 3, "peak_rss_mib": 500.0,
            "peak_gpu_mib": None}


def test_mean_std_over_seeds_and_best_marks(tmp_path):
    records = [record("A", 1, 0.10, 2.0), record("A", 2, 0.14, 4.0),
               record("B", 1, 0.11, 1.0), record("B", 2, 0.12, 1.5),
               record("C", 1, 0.50, 0.1, status="failed")]
    groups = summarize(records)
    write_markdown(tmp_path / "t.md", groups, ["D"], ["A", "B", "C"], [1, 2], [])
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert lines["model"] == ["test ndcg@10", "trainable params", "s/epoch", "epochs to best", "peak RSS MiB"]
    assert lines["A"][0] == f"**{statistics.mean([0.10, 0.14]):.4f} ± {statistics.stdev([0.10, 0.14]):.4f}**"
    assert lines["B"][0] == f"{0.115:.4f} ± {statistics.stdev([0.11, 0.12]):.4f}"
    assert lines["B"][2].startswith("**1.25 ±") and not lines["A"][2].startswith("**")  # fewer seconds is better
    assert lines["A"][1] == lines["B"][1] == "**100 ± 0**"  # ties are all marked
    assert lines["A"][3] == "3.0 ± 0.0"  # epochs to best: reported, never marked
    assert lines["C"][0].startswith("failed: seed 1: boom")


def test_cli_rejects_seed_override(tmp_path, capsys):
    assert experiments_main(["table", "--models", "SASRec", "--datasets", "D", "--output", str(tmp_path),
                             "--seed=3"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_tuning_two_trials_then_resume_reads_finished_trial(slice_config, tmp_path, in_tmp_cwd):
    params_file = tmp_path / "hyper.test"
    params_file.write_text("hidden_size choice [8,16]\n")
    fixed = [f"--{key}={value}" for key, value in slice_config.items() if key != "hidden_size"]
    output = tmp_path / "tuning"
    first = tune("MMSASRec", "SciSlice", params_file, algo="exhaustive", max_evals=1, cmd_args=fixed, output=output)
    assert first["trials"] == 1 and first["read_from_trials_json"] == 0
    trials = json.loads((output / "trials.json").read_text())["trials"]
    assert len(trials) == 1
    first_trial = trials[0]

    # an interrupted search continues: the finished trial is read, only the new one trains
    second = tune("MMSASRec", "SciSlice", params_file, algo="exhaustive", max_evals=2, cmd_args=fixed, output=output)
    assert second["trials"] == 2 and second["read_from_trials_json"] == 1 and second["failed"] == 0
    trials = json.loads((output / "trials.json").read_text())["trials"]
    assert trials[0] == first_trial
    assert sorted(t["params"]["hidden_size"] for t in trials) == [8, 16]
    by_size = {t["params"]["hidden_size"]: t for t in trials}
    assert by_size[16]["parameters"] > by_size[8]["parameters"]  # the tuned value reached the model
    best_trial = max(trials, key=lambda t: t["best_valid_score"])
    best = json.loads((output / "best.json").read_text())
    assert best["best_params"] == best_trial["params"] and best["test_result"] == best_trial["test_result"]

    with pytest.raises(Exception, match="different search"):
        tune("MMSASRec", "SciSlice", params_file, algo="random", max_evals=1, cmd_args=fixed, output=output)


def test_grid_search_visits_every_choice_combination_once():
    import itertools

    import numpy as np
    from hyperopt import Trials, fmin, hp

    from recbole_mm.experiments.tune import grid_search

    space = {"a": hp.choice("a", [1, 2, 3]), "b": hp.choice("b", ["x", "y"])}
    visited = []
    fmin(lambda params: visited.append(params) or 0.0, space, algo=grid_search, max_evals=50, trials=Trials(),
         rstate=np.random.default_rng(0), show_progressbar=False)
    assert sorted((p["a"], p["b"]) for p in visited) == list(itertools.product([1, 2, 3], ["x", "y"]))


def test_ray_path_without_ray_says_what_to_install(monkeypatch, tmp_path):
    from recbole_mm.experiments.tune import run_with_ray
    from recbole_mm.utils import RecboleMMError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as without the ray extra
    with pytest.raises(RecboleMMError, match=r"--ray needs Ray Tune.*'setuptools<81' 'pyarrow<26'"):
        run_with_ray("MMSASRec", "SciSlice", tmp_path / "hyper.test", "exhaustive", 1, output=tmp_path / "ray")


@pytest.mark.stack  # .ci/run's second venv installs the ray extra and requires it (RECBOLE_MM_REQUIRE_EXTRAS=ray)
def test_ray_tune_runs_a_trial(slice_config, tmp_path, in_tmp_cwd):
    from recbole_mm.experiments.tune import run_with_ray

    # without the extra RecBole's ray 2.6.3 is installed but cannot import (no pkg_resources): that is absent
    import_extra("ray.tune", "ray", broken_means_absent=True)
    import_extra("pyarrow", "ray")  # Ray Tune 2.6 reads its experiment folder through it
    params_file = tmp_path / "hyper.test"
    params_file.write_text("hidden_size choice [16]\n")
    fixed = [f"--{key}={value}" for key, value in slice_config.items() if key != "hidden_size"]
    summary = run_with_ray("MMSASRec", "SciSlice", params_file, "exhaustive", 1, cmd_args=fixed,
                           output=tmp_path / "ray", cpus_per_trial=1)
    assert summary["best_params"] == {"hidden_size": 16} and summary["failed"] == 0
    assert 0 <= summary["metrics"]["test ndcg@10"] <= 1
    assert json.loads((tmp_path / "ray" / "best.json").read_text())["best_params"] == {"hidden_size": 16}


def test_an_option_at_its_behaviour_preserving_default_keeps_stored_cells():
    from recbole_mm.experiments.hashing import BEHAVIOUR_PRESERVING_DEFAULTS

    before = {"model": "SASRec", "learning_rate": 0.001, "seed": 2020}  # a cell stored before these options
    with_defaults = {**before, **BEHAVIOUR_PRESERVING_DEFAULTS, "full_sort_item_chunk": 4096}
    assert config_hash(with_defaults) == config_hash(before)
    assert config_hash({**with_defaults, "optimizer_eps": 1e-9}) != config_hash(before)
    assert config_hash({**with_defaults, "gradient_accumulation_loss": "sum"}) != config_hash(before)
    assert config_hash({**with_defaults, "train_micro_batch_size": 128}) != config_hash(before)
    assert config_hash({**before, "learning_rate": 0.003}) != config_hash(before)


# ------------------------------------------------------------------ results stores and the tuner's search
def fake_run_result(score):
    """What measured_run returns, for a run whose validation score is ``score`` (no training)."""
    return {"best_valid_score": score, "valid_score_bigger": True, "best_valid_result": {"ndcg@10": score},
            "test_result": {"ndcg@10": score / 2}, "model": "MMSASRec", "parameters": 10, "epochs": 1,
            "epochs_to_best": 1, "seconds_per_epoch": 0.1}


def test_a_truncated_cell_file_is_trained_again(slice_config, tmp_path, monkeypatch):
    from recbole_mm.experiments import cells
    from recbole_mm.experiments.store import ResultsStore

    trained = []
    monkeypatch.setattr(cells, "measured_run", lambda *args, **kwargs: trained.append(1) or fake_run_result(0.3))
    store = ResultsStore(tmp_path / "out")

    def cell():
        return cells.run_cell(store, "SASRec", "SciSlice", 2020, [], slice_config, [], isolate=False, log=lambda _: None)

    first = cell()
    path = store.path("SASRec", "SciSlice", 2020, first["config_hash"])
    complete = path.read_text()
    assert len(trained) == 1 and cell()["reused"] and len(trained) == 1
    for cut in (len(complete) // 2, len(complete) - 1):  # e.g. a copy that stopped early
        path.write_text(complete[:cut])
        again = cell()
        assert not again["reused"] and again["test_result"] == {"ndcg@10": 0.15}
        assert json.loads(path.read_text())["status"] == "ok"  # the cell file is whole again
    assert len(trained) == 3


WRITE_KILLED_HALFWAY = """
import json, resource, signal, sys
from pathlib import Path

kind, folder, record = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
record["log"] = "x" * 400_000  # the new content: far larger than the file-size limit below
if kind == "cells":
    from recbole_mm.experiments.store import ResultsStore
    store = ResultsStore(folder)
    write = store.save
else:
    from recbole_mm.experiments.tune import TrialStore
    store = TrialStore(folder, {"search": 1})
    write = store.add
# The kernel kills this process with SIGXFSZ when a write passes 100 kB: halfway through the write.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default (the write would just fail)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
write(record)
"""


@pytest.mark.parametrize("kind", ["cells", "trials"])
def test_a_store_write_killed_halfway_leaves_the_previous_file_whole(tmp_path, kind):
    """A real process killed in the middle of writing a results file: the file under its name is still
    the previous, complete one (the table's cell store and the tuner's trials.json)."""
    from recbole_mm.experiments.store import ResultsStore
    from recbole_mm.experiments.tune import TrialStore

    record = {"model": "SASRec", "dataset": "D", "seed": 1, "config_hash": "abc", "status": "ok",
              "params_key": "{}", "test_result": {"ndcg@10": 0.25}}
    if kind == "cells":
        ResultsStore(tmp_path).save(record)
        target = ResultsStore(tmp_path).path("SASRec", "D", 1, "abc")
    else:
        TrialStore(tmp_path, {"search": 1}).add(record)
        target = tmp_path / "trials.json"
    before = target.read_bytes()
    child = subprocess.run([sys.executable, "-c", WRITE_KILLED_HALFWAY, kind, str(tmp_path),
                            json.dumps({**record, "test_result": {"ndcg@10": 0.5}})],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGXFSZ, (child.returncode, child.stderr[-2000:])
    assert target.read_bytes() == before
    if kind == "cells":
        assert ResultsStore(tmp_path).load("SASRec", "D", 1, "abc") == record
    else:
        assert TrialStore(tmp_path, {"search": 1}).trials == [record]


@pytest.fixture
def fake_trials(monkeypatch):
    """measured_run replaced by an instant, deterministic objective; the calls it got, in order."""
    from recbole_mm.experiments import tune as tune_module

    calls, failing = [], set()

    def objective(model, dataset, config_file_list, config_dict, cmd_args):
        calls.append(dict(config_dict))
        if config_dict.get("hidden_size") in failing:
            raise RuntimeError("out of memory")
        learning_rate = config_dict.get("learning_rate", 1e-3)
        return fake_run_result(1.0 / (1.0 + abs(np.log10(learning_rate) + 3)) + config_dict.get("hidden_size", 0) / 1e3)

    monkeypatch.setattr(tune_module, "measured_run", objective)
    return calls, failing


def tuning_args(slice_config):
    return [f"--{key}={value}" for key, value in slice_config.items() if key not in ("hidden_size", "learning_rate")]


def test_bayes_search_replays_its_trials_on_a_rerun(slice_config, tmp_path, fake_trials):
    """TPE with a fixed --tune_seed proposes the same points again (past its 20 random start-up
    points too), so a rerun with a larger --max_evals reads every earlier trial and trains only the new."""
    calls, _ = fake_trials
    params_file = tmp_path / "hyper.test"
    params_file.write_text("learning_rate loguniform -9,-4\nhidden_size choice [8,16]\n")
    output = tmp_path / "bayes"
    fixed = tuning_args(slice_config)
    first = tune("MMSASRec", "SciSlice", params_file, algo="bayes", max_evals=23, early_stop=100, cmd_args=fixed,
                 output=output, log=lambda _: None)
    assert first["trials"] == 23 and first["read_from_trials_json"] == 0 and len(calls) == 23
    first_points = [params_key_of(c) for c in calls]
    assert len(set(first_points)) == 23
    calls.clear()
    second = tune("MMSASRec", "SciSlice", params_file, algo="bayes", max_evals=25, early_stop=100, cmd_args=fixed,
                  output=output, log=lambda _: None)
    assert second["trials"] == 25 and second["read_from_trials_json"] == 23 and len(calls) == 2
    stored = json.loads((output / "trials.json").read_text())["trials"]
    assert [t["params_key"] for t in stored[:23]] == first_points and len(stored) == 25


def params_key_of(params):
    return json.dumps(params, sort_keys=True, default=str)


def test_failed_trials_are_retried_and_finished_ones_read(slice_config, tmp_path, fake_trials):
    calls, failing = fake_trials
    params_file = tmp_path / "hyper.test"
    params_file.write_text("hidden_size choice [8,16]\n")
    output = tmp_path / "retry"
    fixed = tuning_args(slice_config)
    failing.add(16)
    first = tune("MMSASRec", "SciSlice", params_file, max_evals=2, cmd_args=fixed, output=output, log=lambda _: None)
    assert first["failed"] == 1 and first["best_params"] == {"hidden_size": 8}
    trials = json.loads((output / "trials.json").read_text())["trials"]
    assert {t["params"]["hidden_size"]: t["status"] for t in trials} == {8: "ok", 16: "failed"}
    assert "out of memory" in next(t for t in trials if t["status"] == "failed")["error"]
    failing.clear()
    calls.clear()
    second = tune("MMSASRec", "SciSlice", params_file, max_evals=2, cmd_args=fixed, output=output, log=lambda _: None)
    assert [c["hidden_size"] for c in calls] == [16]  # only the failed trial trains again
    assert second["failed"] == 0 and second["read_from_trials_json"] == 1 and second["best_params"] == {"hidden_size": 16}
    trials = json.loads((output / "trials.json").read_text())["trials"]
    assert sorted((t["params"]["hidden_size"], t["status"]) for t in trials) == [(8, "ok"), (16, "ok")]


def test_a_changed_params_file_is_another_search(slice_config, tmp_path, fake_trials):
    from recbole_mm.utils import RecboleMMError

    params_file = tmp_path / "hyper.test"
    params_file.write_text("hidden_size choice [8,16]\n")
    output = tmp_path / "search"
    fixed = tuning_args(slice_config)
    tune("MMSASRec", "SciSlice", params_file, max_evals=1, cmd_args=fixed, output=output, log=lambda _: None)
    params_file.write_text("hidden_size choice [8,16]\n")  # rewritten, same content: the same search
    tune("MMSASRec", "SciSlice", params_file, max_evals=2, cmd_args=fixed, output=output, log=lambda _: None)
    params_file.write_text("hidden_size choice [8,32]\n")
    with pytest.raises(RecboleMMError, match=r"different search \(space_sha256: "):
        tune("MMSASRec", "SciSlice", params_file, max_evals=2, cmd_args=fixed, output=output, log=lambda _: None)
    assert len(json.loads((output / "trials.json").read_text())["trials"]) == 2
