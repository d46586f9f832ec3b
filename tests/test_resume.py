"""Exact resume: a run killed with SIGKILL and resumed from its -last.pth ends exactly where the
uninterrupted run ends (same best validation and test metrics), for a one-stage model (MMSASRec)
and a multi-stage one (Speeder, 2 stages, an LR schedule and model-owned random generators)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from recbole_mm.compat import load_checkpoint
from recbole_mm.trainer.trainer import resume_file_for
from recbole_mm.utils import RecboleMMError
from tests.conftest import PROJECT_ROOT, scientific_slice_config, write_scientific_slice

CLI = str(PROJECT_ROOT / "run_recbole_mm.py")

SPEEDER = dict(
    llm_hidden_size=16, llm_num_layers=1, llm_num_heads=2, mome_hidden_size=8, mome_inner_size=16,
    mome_dropout=0.1, train_batch_size=16, eval_batch_size=128, id_features="none",
    stage_modalities=[["text"], ["text", "image"]], stage_epochs=[1, 2], warmup_steps=2, ppt_rate=0.3,
)
RUNS = {
    # dropout on, so the torch random state matters; shuffled batches, so the loader's generator does
    "MMSASRec": dict(hidden_dropout_prob=0.3, lr_scheduler="warmup_cosine", warmup_steps=2),
    "Speeder": SPEEDER,
}


def result_line(stdout):
    line = [l for l in stdout.splitlines() if l.startswith("[recbole-mm]")][-1]
    return line.split(" checkpoint=")[0]  # the checkpoint paths differ between the two runs


# one torch thread: only then are two CPU runs bit-identical (docs/reliability.md, "Exact resume")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, cwd):
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=ONE_THREAD)


@pytest.mark.parametrize("model", ["MMSASRec", "Speeder"])
def test_three_epochs_straight_equal_one_epoch_kill_resume(model, scientific_dir, tmp_path):
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=60)
    config = scientific_slice_config(tmp_path / "data", **{"epochs": 3, "train_batch_size": 32, **RUNS[model]})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    common = [f"--model={model}", "--dataset=SciSlice", f"--config_files={config_file}"]

    straight = cli(*common, "--checkpoint_dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = subprocess.Popen([sys.executable, CLI, *common, "--checkpoint_dir=killed"], cwd=tmp_path, env=ONE_THREAD,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    resume_points = []
    while not resume_points and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        resume_points = list((tmp_path / "killed").glob("*-last.pth"))
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert resume_points, "no resume point was written"
    resume_point = load_checkpoint(resume_points[0])
    assert resume_point["resume"]["next_epoch"] in (1, 2)

    resumed = cli(*common, "--checkpoint_dir=killed", f"--resume={resume_points[0]}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resume training from epoch {resume_point['resume']['next_epoch']}" in resumed.stdout + resumed.stderr
    assert re.search(r"test=\{'\w+@?\d*': [0-9.]+", result_line(straight.stdout))
    assert result_line(resumed.stdout) == result_line(straight.stdout)


def test_resume_point_holds_what_training_depends_on(scientific_dir, tmp_path, monkeypatch):
    from recbole_mm.quick_start import build

    monkeypatch.chdir(tmp_path)
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=40)
    config = scientific_slice_config(tmp_path / "data", epochs=2, lr_scheduler="warmup_linear", warmup_steps=1)
    _, (train, valid, _), _, trainer = build("MMSASRec", "SciSlice", config_dict=config)
    trainer.fit(train, valid, saved=True, show_progress=False)
    point = torch.load(resume_file_for(trainer.saved_model_file), weights_only=True)
    assert point["epoch"] == 0 and point["resume"]["next_epoch"] == 1
    assert point["resume"]["best_model_file"] == trainer.saved_model_file
    assert point["resume"]["scheduler"]["last_epoch"] == len(train)  # one epoch of optimizer steps
    assert point["optimizer"]["state"], "the optimizer's moments are saved"
    states = point["resume"]["random_states"]
    assert {"torch", "numpy", "python", "generators"} <= set(states)
    assert "train_data.generator" in states["generators"]  # RecBole's shuffle generator


def test_resume_restores_the_early_stopping_state(scientific_dir, tmp_path, monkeypatch):
    """A resumed trainer starts epoch 1 with the counters the uninterrupted one had there: the epochs
    without a gain (cur_step), the best validation score and result (early stopping and the best
    checkpoint depend on them)."""
    from recbole_mm.quick_start import build

    monkeypatch.chdir(tmp_path)
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=40)
    config = scientific_slice_config(tmp_path / "data", epochs=2)
    _, (train, valid, _), _, trainer = build("MMSASRec", "SciSlice", config_dict=config)
    at_epoch_start = {}
    record = trainer._resume_point

    def recording_resume_point(train_data, epoch_idx):
        at_epoch_start[epoch_idx] = (trainer.cur_step, trainer.best_valid_score, dict(trainer.best_valid_result or {}))
        return record(train_data, epoch_idx)

    trainer._resume_point = recording_resume_point
    trainer.fit(train, valid, saved=True, show_progress=False)
    cur_step, best_score, best_result = at_epoch_start[1]
    assert best_result and best_score == best_result["ndcg@10"] > 0

    _, (train, valid, _), _, resumed = build("MMSASRec", "SciSlice", config_dict=config)
    resumed.resume_checkpoint(resume_file_for(trainer.saved_model_file))
    resumed._resume_point(train, 1)
    assert resumed.cur_step == cur_step
    assert resumed.best_valid_score == pytest.approx(best_score, abs=1e-7)
    assert dict(resumed.best_valid_result) == pytest.approx(best_result, abs=1e-7)


def test_resume_with_changed_stages_is_refused(scientific_dir, tmp_path, monkeypatch):
    """A resume point written in one stage layout cannot continue under another."""
    from recbole_mm.quick_start import build

    monkeypatch.chdir(tmp_path)
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=40)
    config = scientific_slice_config(tmp_path / "data", epochs=2, **SPEEDER)
    config["stage_epochs"] = [1, 1]
    _, (train, valid, _), _, trainer = build("Speeder", "SciSlice", config_dict=config)
    trainer.fit(train, valid, saved=True, show_progress=False)
    point = resume_file_for(trainer.saved_model_file)
    config["stage_epochs"] = [2, 1]
    _, (train, valid, _), _, again = build("Speeder", "SciSlice", config_dict=config)
    again.resume_checkpoint(point)
    with pytest.raises(RecboleMMError, match="stage"):
        again.fit(train, valid, saved=True, show_progress=False)
