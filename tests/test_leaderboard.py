import csv
import math
import random

import numpy as np
import pytest
import yaml
from scipy import stats

from recbole_mm.experiments.cells import run_cell
from recbole_mm.experiments.leaderboard import load_spec, run_leaderboard, trial_points
from recbole_mm.experiments.significance import compare
from recbole_mm.experiments.store import ResultsStore
from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.lock import output_lock
from tests.conftest import PROJECT_ROOT as ROOT, write_scientific_slice


def record(seed, users, values):
    return {"seed": seed, "per_user": {"users": list(users), "metrics": {"ndcg@10": list(values)}}}


def test_paired_t_test_matches_the_formula_and_pairs_by_user():
    rng = random.Random(0)
    users = [f"u{i}" for i in range(40)]
    model = {s: [rng.random() for _ in users] for s in (1, 2)}
    reference = {s: [v - 0.05 + rng.gauss(0, 0.1) for v in model[s]] for s in (1, 2)}
    shuffled = {}
    for s in (1, 2):  # the reference lists its users in another order: pairing must follow the tokens
        order = list(range(len(users)))
        rng.shuffle(order)
        shuffled[s] = record(s, [users[i] for i in order], [reference[s][i] for i in order])
    result = compare([record(s, users, model[s]) for s in (1, 2)], [shuffled[1], shuffled[2]], "ndcg@10")
    differences = [a - b for s in (1, 2) for a, b in zip(model[s], reference[s])]
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    assert result["n"] == n == 80
    assert result["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-9)
    ref_mean = sum(v for s in (1, 2) for v in reference[s]) / n
    assert result["relative_change"] == pytest.approx((mean + ref_mean) / ref_mean - 1)
    assert 0 < result["wilcoxon_p"] < 1


def test_only_common_seeds_and_users_are_paired():
    result = compare([record(1, ["a", "b", "c"], [1, 0, 1]), record(9, ["a"], [1])],
                     [record(1, ["b", "c", "d"], [0, 0, 1])], "ndcg@10")
    assert result["n"] == 2 and result["mean"] == 0.5 and result["reference_mean"] == 0.0
    assert compare([record(1, ["a"], [1])], [record(1, ["a"], [1])], "ndcg@10")["t_p"] == 1.0


def test_spec_errors_name_the_problem(tmp_path):
    path = tmp_path / "spec.yaml"
    base = {"dataset": "D", "reference": "SASRec", "metric": "ndcg@10", "seeds": [1],
            "models": {"SASRec": {"learning_rate": [1, 2, 3], "hidden_dropout_prob": [0.1, 0.2]}}}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(RecboleMMError, match="6 points, more than max_trials=4"):
        load_spec(path)
    path.write_text(yaml.safe_dump({**base, "reference": "GRU4Rec"}))
    with pytest.raises(RecboleMMError, match="reference 'GRU4Rec' is not one of the models"):
        load_spec(path)
    path.write_text(yaml.safe_dump({**base, "seed": [1]}))
    with pytest.raises(RecboleMMError, match="unknown keys"):
        load_spec(path)
    path.write_text(yaml.safe_dump({**base, "tuned_on": "Other", "models": {"SASRec": {"learning_rate": [1, 2]}}}))
    with pytest.raises(RecboleMMError, match="2 points, but tuned_on='Other'"):
        load_spec(path)
    assert trial_points({"b": [1, 2], "a": [3]}) == [{"a": 3, "b": 1}, {"a": 3, "b": 2}]
    assert trial_points({}) == [{}]


@pytest.mark.parametrize("spec_name", ["Office", "Scientific-candidates", "lastfm-llara"])
def test_reusing_specs_train_the_points_scientific_tuning_chose(spec_name):
    """Office and the candidate protocols say they reuse Scientific's tuning: each point must be the best
    validation trial in Scientific's committed tuning.csv (read here independently of the runner); a
    model Scientific did not tune runs its defaults (an empty space)."""
    spec = load_spec(ROOT / "benchmarks" / "leaderboard" / f"{spec_name}.yaml")
    assert spec["tuned_on"] == "Scientific"
    best = {}
    with open(ROOT / "benchmarks" / "results" / "leaderboard" / "Scientific" / "tuning.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["status"] == "ok" and float(row["valid_score"]) > best.get(row["model"], (-1.0, None))[0]:
                best[row["model"]] = (float(row["valid_score"]), yaml.safe_load(row["params"]))
    for model, space in spec["models"].items():
        assert trial_points(space) == [best[model][1] if model in best else {}], model


def write_slice_budget(path, data, **training):
    """A config file for the Scientific slice at ``data`` (benchmark split, text + image) with tiny sizes."""
    path.write_text(yaml.safe_dump({
        "data_path": str(data), "benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "TIME_FIELD": None,
        "modalities": ["text", "image"],
        "feature_tables": {"text": {"path": "SciSlice.feat1CLS", "dim": 512},
                           "image": {"path": "SciSlice.feat3CLS", "dim": 512}},
        "hidden_size": 16, "inner_size": 32, "n_layers": 1, "train_batch_size": 256, "eval_batch_size": 256,
        **training}))
    return path


def test_leaderboard_tunes_on_valid_trains_seeds_and_resumes(scientific_dir, in_tmp_cwd):
    data = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, data, n_users=80)
    budget = write_slice_budget(in_tmp_cwd / "budget.yaml", data, epochs=2, stopping_step=10)
    spec_path = in_tmp_cwd / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "dataset": "SciSlice", "reference": "SASRec", "metric": "ndcg@10", "seeds": [2020, 2021],
        "config_files": [str(budget)], "models": {"SASRec": {}, "MMSASRec": {"learning_rate": [0.01, 0.0001]}}}))
    spec = load_spec(spec_path)
    output = in_tmp_cwd / "board"
    outcomes = run_leaderboard(spec, output, isolate=False, log=lambda message: None)

    trials = outcomes["MMSASRec"]["trials"]
    best = max(trials, key=lambda trial: trial["record"]["best_valid_score"])
    assert outcomes["MMSASRec"]["best_params"] == best["params"]  # chosen on validation, not test
    finals = outcomes["MMSASRec"]["finals"]
    assert [r["seed"] for r in finals] == [2020, 2021] and finals[0]["config_hash"] == best["record"]["config_hash"]
    for r in finals:
        # 2 epochs of a cap of 2 without an early stop: not converged
        assert r["epochs"] == r["epoch_cap"] == 2
        per_user = r["per_user"]
        assert len(per_user["users"]) == len(set(per_user["users"])) == 80
        assert np.mean(per_user["metrics"]["ndcg@10"]) == pytest.approx(r["test_result"]["ndcg@10"], abs=1e-4)
    table = (output / "table.md").read_text()
    assert "| MMSASRec | learning_rate=" in table and "0/2" in table and "reference" in table
    assert (output / "ndcg_at_10.png").stat().st_size > 0
    assert len((output / "tuning.csv").read_text().splitlines()) == 1 + 1 + 2

    assert "Complete: every model and ablation of the spec on every seed." in table

    again = run_leaderboard(spec, output, isolate=False, log=lambda message: None)
    assert all(r["reused"] for o in again.values() for r in o["finals"])

    # A run of one model keeps the other model's row; a report names what the store lacks.
    (output / "table.md").unlink()
    run_leaderboard(spec, output, models=["SASRec"], isolate=False, log=lambda message: None)
    assert "| MMSASRec | learning_rate=" in (output / "table.md").read_text()
    spec["models"]["GRU4Rec"] = {}
    spec["seeds"] = [2020, 2021, 2022]
    report = run_leaderboard(spec, output, isolate=False, log=lambda message: None, train=False)
    assert set(report) == {"SASRec", "MMSASRec"}
    table = (output / "table.md").read_text()
    missing = ", ".join(f"{model} (2 of 3 seeds)" for model in spec["models"] if model != "GRU4Rec")
    assert f"INCOMPLETE: not run yet: GRU4Rec; seeds still missing: {missing}." in table
    assert not list((output / "cells").glob("GRU4Rec_*")) and not list((output / "cells").glob("*seed2022*"))


def test_ablation_trains_the_full_models_best_point_with_the_switch_and_compares_with_it(scientific_dir, in_tmp_cwd):
    data = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, data, n_users=60)
    budget = write_slice_budget(in_tmp_cwd / "budget.yaml", data, epochs=1)
    spec_path = in_tmp_cwd / "spec.yaml"
    base = {"dataset": "SciSlice", "reference": "SASRec", "metric": "ndcg@10", "seeds": [2020],
            "config_files": [str(budget)], "models": {"SASRec": {}, "MMSASRec": {"learning_rate": [0.01, 0.001]}},
            "ablations": {"MMSASRec text only": {"of": "MMSASRec", "set": {"modalities": ["text"]}}}}
    spec_path.write_text(yaml.safe_dump(base))
    spec = load_spec(spec_path)
    output = in_tmp_cwd / "board"
    with pytest.raises(RecboleMMError, match="run --models MMSASRec first"):
        run_leaderboard(spec, output, models=["MMSASRec text only"], isolate=False, log=lambda message: None)
    outcomes = run_leaderboard(spec, output, isolate=False, log=lambda message: None)

    full, ablated = outcomes["MMSASRec"], outcomes["MMSASRec text only"]
    (record,) = ablated["finals"]
    # the cell is exactly the full model's best point plus the switch: the store holds it under that config
    direct = run_cell(ResultsStore(output), "MMSASRec", "SciSlice", 2020, [str(budget)],
                      {**full["best_params"], "modalities": ["text"], "checkpoint_dir": "saved/leaderboard/SciSlice",
                       "show_progress": False}, (), isolate=False, per_user=True, train=False)
    assert direct["status"] == "ok" and direct["config_hash"] == record["config_hash"]
    assert record["config_hash"] != full["finals"][0]["config_hash"]
    # the relative change against the full model, from the per-user arrays (same users, same seed)
    mine = dict(zip(record["per_user"]["users"], record["per_user"]["metrics"]["ndcg@10"]))
    theirs = dict(zip(full["finals"][0]["per_user"]["users"], full["finals"][0]["per_user"]["metrics"]["ndcg@10"]))
    change = np.mean([mine[user] for user in theirs]) / np.mean(list(theirs.values())) - 1
    table = (output / "table.md").read_text()
    assert "## Ablations" in table
    assert f"| MMSASRec text only | MMSASRec | modalities=['text'] |" in table and f"{change:+.1%}" in table
    rows = list(csv.DictReader(open(output / "ablations.csv")))
    assert rows[0]["ablation"] == "MMSASRec text only" and float(rows[0]["relative_change"]) == pytest.approx(change)
    assert "Complete: every model and ablation" in table

    # a report from the store keeps the ablation row; bad ablation specs are refused by name
    report = run_leaderboard(spec, output, isolate=False, log=lambda message: None, train=False)
    assert report["MMSASRec text only"]["finals"][0]["reused"]
    for ablations, message in (({"MMSASRec": {"of": "MMSASRec", "set": {"x": 1}}}, "has the name of a model"),
                               ({"A": {"of": "GRU4Rec", "set": {"x": 1}}}, "is not one of the models"),
                               ({"A": {"of": "MMSASRec"}}, "must be {of: <model>, set:")):
        spec_path.write_text(yaml.safe_dump({**base, "ablations": ablations}))
        with pytest.raises(RecboleMMError, match=message):
            load_spec(spec_path)


def test_a_second_leaderboard_run_on_one_output_stops_at_once(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"dataset": "SciSlice", "reference": "SASRec", "metric": "ndcg@10",
                                         "seeds": [2020], "models": {"SASRec": {}}}))
    with output_lock(tmp_path / "board", "a leaderboard run"):
        with pytest.raises(RecboleMMError, match="is in use by a leaderboard run"):
            run_leaderboard(load_spec(spec_path), tmp_path / "board", log=lambda message: None)
    assert not (tmp_path / "board" / "cells").exists()


def test_candidate_protocol_leaderboard_pairs_each_users_top1_hit(scientific_dir, in_tmp_cwd):
    """metric: vhr@1 names the table column (hits / rows) and the per-user pairs (each user's top-1 hit)."""
    data = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, data, n_users=60)
    budget = write_slice_budget(in_tmp_cwd / "budget.yaml", data, epochs=1, candidate_protocol=True,
                                num_candidates=5, metrics=["HR", "ValidRatio", "VHR"], topk=[1],
                                valid_metric="VHR@1")
    spec_path = in_tmp_cwd / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "dataset": "SciSlice", "reference": "SASRec", "metric": "vhr@1", "seeds": [2020],
        "config_files": [str(budget)], "models": {"SASRec": {}, "MMSASRec": {}}}))
    output = in_tmp_cwd / "board"
    outcomes = run_leaderboard(load_spec(spec_path), output, isolate=False, log=lambda message: None)
    hits = {}
    for model in ("SASRec", "MMSASRec"):
        (record,) = outcomes[model]["finals"]
        values = record["per_user"]["metrics"]["vhr@1"]
        assert set(values) <= {0.0, 1.0} and len(values) == 60
        assert np.mean(values) == pytest.approx(record["test_result"]["vhr@1"], abs=1e-4)
        hits[model] = dict(zip(record["per_user"]["users"], values))
    change = np.mean([hits["MMSASRec"][u] for u in hits["SASRec"]]) / np.mean(list(hits["SASRec"].values())) - 1
    table = (output / "table.md").read_text()
    assert "vhr@1 vs SASRec" in table and f"{change:+.1%}" in table
    assert (output / "vhr_at_1.png").stat().st_size > 0


def test_default_output_is_named_after_the_spec_file_not_its_dataset(scientific_dir, in_tmp_cwd):
    """Two specs of one dataset (full ranking, candidate protocol) must not write over each other's tables."""
    from recbole_mm.experiments.leaderboard import main

    data = in_tmp_cwd / "data"
    write_scientific_slice(scientific_dir, data, n_users=20)
    budget = write_slice_budget(in_tmp_cwd / "budget.yaml", data, epochs=1)
    spec_path = in_tmp_cwd / "SciSlice-candidates.yaml"
    spec_path.write_text(yaml.safe_dump({"dataset": "SciSlice", "reference": "SASRec", "metric": "ndcg@10",
                                         "seeds": [2020], "config_files": [str(budget)], "models": {"SASRec": {}}}))
    main(["--spec", str(spec_path), "--report"])
    boards = in_tmp_cwd / "benchmarks" / "results" / "leaderboard"
    assert (boards / "SciSlice-candidates" / "table.md").is_file() and not (boards / "SciSlice").exists()
