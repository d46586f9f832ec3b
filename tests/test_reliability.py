"""Bad input and faults at the command line: exit status 2, one paragraph naming the input and
the fix, never a traceback (docs/reliability.md lists each case); concurrent runs on one output."""
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from recbole_mm.utils import RecboleMMError
from recbole_mm.utils.lock import output_lock
from tests.conftest import PROJECT_ROOT, scientific_slice_config, write_scientific_slice

CLI = str(PROJECT_ROOT / "run_recbole_mm.py")


def command(*args, cwd, module=None):
    prefix = [sys.executable, "-m", module] if module else [sys.executable, CLI]
    return subprocess.run([*prefix, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def trained(scientific_dir, tmp_path):
    """A slice, its config file and a real 1-epoch MMSASRec checkpoint."""
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=40)
    config_file = tmp_path / "slice.yaml"
    config_file.write_text(yaml.safe_dump(scientific_slice_config(tmp_path / "data")))
    result = command("--model=MMSASRec", "--dataset=SciSlice", f"--config_files={config_file}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / result.stdout.strip().splitlines()[-1].split("checkpoint=")[1]
    return config_file, checkpoint


def test_typo_and_wrong_type_on_the_command_line(tmp_path):
    assert_clean_error(command("--model=MMSASRec", "--dataset=Scientific", "--hiden_size=128", cwd=tmp_path),
                       "--hiden_size", "did you mean hidden_size")
    assert_clean_error(command("--model=MMSASRec", "--dataset=Scientific", "--learning_rate=abc", cwd=tmp_path),
                       "--learning_rate", "'abc'", "a number")
    assert_clean_error(command("--model=MMSASRec", "--dataset=Scientific", f"--config_files={tmp_path}/no.yaml",
                               cwd=tmp_path), "no.yaml", "not found")


def test_damaged_checkpoints_passed_to_resume(trained, tmp_path):
    config_file, checkpoint = trained
    common = ["--model=MMSASRec", "--dataset=SciSlice", f"--config_files={config_file}"]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert_clean_error(command(*common, f"--resume={truncated}", cwd=tmp_path), "truncated.pth", "truncated")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert_clean_error(command(*common, f"--resume={foreign}", cwd=tmp_path), "not a recbole-mm or RecBole checkpoint")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert_clean_error(command(*common, f"--resume={text}", cwd=tmp_path), "not a PyTorch checkpoint")
    assert_clean_error(command(*common, f"--resume={tmp_path}/gone.pth", cwd=tmp_path), "gone.pth", "not found")
    # a checkpoint of other sizes (e.g. trained with another yaml): no size-mismatch traceback
    assert_clean_error(command(*common, "--hidden_size=32", f"--resume={checkpoint}", cwd=tmp_path),
                       "other sizes", "--config_files")


class RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_checkpoint_loader_never_runs_pickled_code(tmp_path):
    """compat.load_checkpoint must unpickle with weights_only=True: with weights_only=False this file
    loads as a valid checkpoint and creates the marker directory."""
    from recbole_mm.compat import load_checkpoint

    marker = tmp_path / "code-ran"
    malicious = tmp_path / "malicious.pth"
    torch.save({"config": {"model": "SASRec"}, "state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, malicious)
    with pytest.raises(RecboleMMError, match="pickled Python objects"):
        load_checkpoint(malicious)
    assert not marker.exists(), "loading the checkpoint executed the pickled call"


def test_recbole_trainer_checkpoint_is_refused_with_the_reason(tmp_path):
    """What RecBole 1.2.1's Trainer._save_checkpoint writes: its Config object pickled beside the weights."""
    from recbole.config import Config as RecBoleConfig

    from recbole_mm.compat import load_checkpoint

    config = RecBoleConfig("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path), "show_progress": False,
                                                              "train_neg_sample_args": None})
    recbole_file = tmp_path / "SASRec-recbole.pth"
    torch.save({"config": config, "epoch": 0, "cur_step": 3, "best_valid_score": 0.1,
                "state_dict": {"item_embedding.weight": torch.zeros(4, 2)}, "other_parameter": None,
                "optimizer": {"state": {}, "param_groups": []}}, recbole_file, pickle_protocol=4)
    with pytest.raises(RecboleMMError, match="pickled Python objects") as error:
        load_checkpoint(recbole_file)
    assert "RecBole's own Trainer pickles its Config" in str(error.value) and str(recbole_file) in str(error.value)


def test_table_runner_bad_input_exits_2_before_training(tmp_path):
    result = command("table", "--models", "SASRec", "NoSuchModel", "--datasets", "Scientific", "--output",
                     str(tmp_path / "out"), cwd=tmp_path, module="recbole_mm.experiments")
    assert_clean_error(result, "Unknown model 'NoSuchModel'", "Nothing was trained")
    result = command("table", "--models", "SASRec", "--datasets", "Scientific", "--output", str(tmp_path / "out"),
                     "--hiden_size=8", cwd=tmp_path, module="recbole_mm.experiments")
    assert_clean_error(result, "--hiden_size", "did you mean hidden_size")
    assert not (tmp_path / "out" / "cells").exists()


def test_tuner_bad_input_exits_2(tmp_path):
    params = tmp_path / "hyper.test"
    params.write_text("hiden_size choice [8,16]\n")
    result = command("--model=SASRec", "--dataset=Scientific", f"--params_file={params}", cwd=tmp_path,
                     module="recbole_mm.experiments.tune")
    assert_clean_error(result, "hiden_size", "did you mean hidden_size", str(params))
    params.write_text("learning_rate choice ['fast']\n")
    result = command("--model=SASRec", "--dataset=Scientific", f"--params_file={params}", cwd=tmp_path,
                     module="recbole_mm.experiments.tune")
    assert_clean_error(result, "learning_rate", "'fast'", "a number")


def test_converter_bad_input_exits_2(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "dataset_conversion" / "amazon.py"), "--reviews",
                             str(tmp_path / "none.json.gz"), "--meta", str(tmp_path / "meta.json.gz"), "--dataset",
                             "X", "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert_clean_error(result, "none.json.gz", "not found")


def test_fmrlrec_tool_bad_checkpoint_exits_2(tmp_path):
    bad = tmp_path / "FMRLRec.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = command("evaluate", "--checkpoint", str(bad), cwd=tmp_path, module="recbole_mm.tools.fmrlrec")
    assert_clean_error(result, "FMRLRec.pth", "truncated")


# ------------------------------------------------------------------------------------------------
# Two runs on one output folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def slice_file(scientific_dir, tmp_path):
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=40)
    config_file = tmp_path / "endless.yaml"
    config_file.write_text(yaml.safe_dump({**scientific_slice_config(tmp_path / "data"), "epochs": 100000,
                                           "stopping_step": 100000}))
    return config_file


def test_second_table_runner_on_the_same_output_is_refused(slice_file, tmp_path):
    output = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "recbole_mm.experiments", "table", "--models", "SASRec",
                              "--datasets", "SciSlice", "--config_files", str(slice_file), "--output", str(output)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (output / ".lock").is_file() or not (output / ".lock").read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None, "the first runner never took the lock"
            time.sleep(0.2)
        second = command("table", "--models", "SASRec", "--datasets", "SciSlice", "--config_files", str(slice_file),
                         "--output", str(output), cwd=tmp_path, module="recbole_mm.experiments")
        assert_clean_error(second, str(output), f"pid {first.pid}", "another --output")
        assert first.poll() is None, "the first runner was disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    with output_lock(output, "a later run"):  # kill -9 leaves no stale lock
        pass


def test_second_tuner_on_the_same_output_is_refused(slice_file, tmp_path):
    output = tmp_path / "tuning"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom recbole_mm.utils.lock import output_lock\n"
                               "with output_lock(sys.argv[1], 'a tuning run'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n", str(output)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        params = tmp_path / "hyper.test"
        params.write_text("hidden_size choice [8]\n")
        result = command("--model=SASRec", "--dataset=SciSlice", f"--config_files={slice_file}",
                         f"--params_file={params}", f"--output={output}", cwd=tmp_path,
                         module="recbole_mm.experiments.tune")
        assert_clean_error(result, "in use by a tuning run", f"pid {holder.pid}")
        assert not (output / "trials.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
