"""End to end through run_recbole_mm.py on the real Scientific data (1 epoch, tiny sizes)."""
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import PROJECT_ROOT

CLI = str(PROJECT_ROOT / "run_recbole_mm.py")
TINY = ["--epochs=1", "--hidden_size=16", "--inner_size=32", "--show_progress=False",
        "--train_batch_size=512", "--eval_batch_size=1024"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model", ["MMSASRec", "SASRec"])
def test_one_epoch_train_and_test(model, scientific_dir, tmp_path):
    result = run_cli(f"--model={model}", "--dataset=Scientific", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("[recbole-mm]")][-1]
    assert f"model={model} dataset=Scientific" in line
    test_metrics = dict(re.findall(r"'(\w+@\d+)': ([0-9.]+)", line.split("test=")[1]))
    assert set(test_metrics) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert 0 < float(test_metrics["ndcg@10"]) <= float(test_metrics["recall@10"]) <= 1
    checkpoint = tmp_path / line.split("checkpoint=")[1]
    state = torch.load(checkpoint, weights_only=True)
    assert state["config"]["model"] == model and state["config"]["hidden_size"] == 16


def test_unknown_model_lists_names(tmp_path):
    result = run_cli("--model=SASrec", "--dataset=Scientific", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown model 'SASrec'" in result.stderr and "MMSASRec" in result.stderr and "GRU4Rec" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_says_where_it_looked(tmp_path):
    result = run_cli("--model=SASRec", "--dataset=Office", f"--data_path={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "Office") in result.stderr and "dataset_conversion" in result.stderr


def test_bad_feature_file_is_a_clean_error(scientific_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("feature_tables:\n  text: {path: Scientific.feat1CLS, dim: 500}\n  image: {path: Scientific.feat3CLS, dim: 512}\n")
    result = run_cli("--model=MMSASRec", "--dataset=Scientific", f"--config_files={bad}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Scientific.feat1CLS" in result.stderr and "dim 500" in result.stderr
