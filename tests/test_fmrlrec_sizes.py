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
