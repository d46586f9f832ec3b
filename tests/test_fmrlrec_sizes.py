"""FMRLRec's ordinary training run reports every nested size (valid and test), from one pass."""
import pytest

from recbole_mm.model.fmrlrec import extract_submodel, submodel_config
from recbole_mm.quick_start import build, run
from recbole_mm.trainer import MMTrainer
from tests.conftest import scientific_slice_config, write_scientific_slice


def test_training_run_reports_every_size_and_each_equals_the_extracted_model(scientific_dir, in_tmp_cwd):
    write_scientific_slice(scientific_dir, in_tmp_cwd, n_users=80)
    config_dict = scientific_slice_config(in_tmp_cwd, hidden_size=16, epochs=2,
                                          checkpoint_dir=str(in_tmp_cwd / "saved"))
    result = run("FMRLRec", "SciSlice", config_dict=config_dict)
    per_size = result["test_result_per_size"]
    assert sorted(per_size) == [8, 16] and sorted(result["best_valid_result_per_size"]) == [8, 16]
    assert per_size[16] == result["test_result"]  # the largest size is the ordinary result

    # independently: extract the size-8 model and evaluate it the ordinary (single-size) way
    config, (train_data, _, test_data), model, trainer = build("FMRLRec", "SciSlice", config_dict=config_dict)
    trainer.load_model_checkpoint(result["checkpoint"])
    small = extract_submodel(model, config, train_data.dataset, 8)
    small_trainer = MMTrainer(submodel_config(config, 8), small)
    small_result = small_trainer.evaluate(test_data, load_best_model=False)
    for key, value in small_result.items():
        assert per_size[8][key] == pytest.approx(float(value), abs=1e-4), key


def test_leaderboard_cell_keeps_per_user_metrics_and_every_size(scientific_dir, in_tmp_cwd):
    """A leaderboard cell (per-user test metrics for the significance test) of FMRLRec: the per-size
    evaluation must go through the trainer's own collector, or the per-user recorder sees nothing."""
    from recbole_mm.experiments.measure import measured_run

    write_scientific_slice(scientific_dir, in_tmp_cwd, n_users=60)
    config_dict = scientific_slice_config(in_tmp_cwd, hidden_size=16, epochs=1,
                                          checkpoint_dir=str(in_tmp_cwd / "saved"))
    result = measured_run("FMRLRec", "SciSlice", config_dict=config_dict, per_user=True)
    users, metrics = result["per_user"]["users"], result["per_user"]["metrics"]
    assert len(users) == 60 and len(set(users)) == 60
    assert sorted(result["test_result_per_size"]) == [8, 16]
    # the per-user rows average to the reported (largest size's) test metric
    assert sum(metrics["ndcg@10"]) / len(users) == pytest.approx(float(result["test_result"]["ndcg@10"]), abs=1e-4)


def test_family_command_reports_each_sizes_share_of_its_own_runs_largest(tmp_path, capsys):
    import json

    from recbole_mm.tools.fmrlrec import main

    cells = tmp_path / "cells"
    cells.mkdir()
    runs = {2020: {"8": 0.02, "16": 0.03, "32": 0.04}, 2021: {"8": 0.03, "16": 0.05, "32": 0.06}}
    for seed, per_size in runs.items():
        (cells / f"FMRLRec_D_seed{seed}_x.json").write_text(json.dumps({
            "model": "FMRLRec", "dataset": "D", "seed": seed,
            "test_result_per_size": {size: {"ndcg@10": value} for size, value in per_size.items()}}))
    assert main(["family", "--cells", str(cells)]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    # size 16: 0.03 / 0.04 = 75% and 0.05 / 0.06 = 83.3%, mean 79.2%, sample std 5.9%
    assert rows["16"].endswith("| 79.2% ± 5.9% |") and "0.0300 (75.0%)" in rows["16"] and "(83.3%)" in rows["16"]
    assert rows["8"].endswith("| 50.0% ± 0.0% |")
    (cells / "FMRLRec_D_seed2022_y.json").write_text(json.dumps({"model": "FMRLRec", "seed": 2022}))
    assert main(["family", "--cells", str(cells)]) == 2
    assert "FMRLRec_D_seed2022_y.json: no 'test_result_per_size'" in capsys.readouterr().err
