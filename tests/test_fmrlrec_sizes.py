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
