# One-off: the partial table of a leaderboard run still in progress, from its stored cells (the run itself
# writes table.md whenever a model finishes). Usage: python benchmarks/leaderboard/partial_report.py
import json, sys
from pathlib import Path
from recbole_mm.experiments.leaderboard import load_spec, trial_points, write_outputs, valid_key
spec = load_spec("benchmarks/leaderboard/Scientific.yaml")
cells = [json.loads(p.read_text()) for p in Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/leaderboard/Scientific/cells").glob("*.json")]
outcomes = {}
for model, space in spec["models"].items():
    recs = [c for c in cells if c["model"] == model and c["status"] == "ok"]
    if not recs: continue
    trials = []
    for params in trial_points(space):
        match = [c for c in recs if c["seed"] == spec["seeds"][0] and all(c["config"].get(k) == v for k, v in params.items())]
        if match: trials.append({"params": params, "record": match[0]})
    if len(trials) < len(trial_points(space)): continue
    best = max(trials, key=lambda t: valid_key(t["record"]))
    finals = [best["record"]] + [c for c in recs if c["seed"] in spec["seeds"][1:]
              and all(c["config"].get(k) == v for k, v in best["params"].items())]
    outcomes[model] = {"model": model, "trials": trials, "best_params": best["params"], "finals": finals}
out = Path("benchmarks/results/leaderboard/Scientific")
write_outputs(out, spec, outcomes, [
    "PARTIAL: the run was still going when this session ended; rows list the seeds finished so far "
    f"(models tuned: {', '.join(outcomes)}; not started: the rest of the spec).",
    "Machines (as each cell recorded them): " + "; ".join(sorted({c.get("machine", "?").split(", load average")[0] for c in cells}))
    + ". Up to 3 cells or benchmarks shared the 2 cores.",
    "Each model tuned over 2 learning rates on seed 2020's validation NDCG@10, best point on seeds 2020-2022; epoch cap 300, "
    "early stopping after 10 validations without a gain, hidden_size 64 for every model. Significance: ndcg@10 per test "
    "user vs SASRec, paired by user and seed, pooled over the seeds both have."])
for m, o in outcomes.items(): print(m, o["best_params"], [ (r["seed"], r["test_result"]["ndcg@10"], r["epochs"]) for r in o["finals"]])
