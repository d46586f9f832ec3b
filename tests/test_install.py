"""The package as a user installs it: a wheel (not the editable checkout) in a fresh virtual
environment, run from another directory; and the default dataset, built on first use offline."""
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, write_scientific_slice


def run_checked(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A venv holding only the built wheel; the test venv's other packages are visible through a
    plain path entry (no .pth processing there, so the editable checkout stays invisible)."""
    root = tmp_path_factory.mktemp("wheel")
    run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(root / "dist"), str(PROJECT_ROOT)])
    wheel = next((root / "dist").glob("recbole_mm-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run_checked([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the test venv's own (editable) recbole-mm is visible through the path entry
    run_checked([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                 str(wheel)])
    return env_dir, wheel


def test_wheel_ships_the_properties(wheel_venv):
    import zipfile

    _, wheel = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {f"recbole_mm/properties/{path.relative_to(PROJECT_ROOT / 'properties')}"
                for path in (PROJECT_ROOT / "properties").rglob("*.yaml")}
    assert packaged and packaged <= names


def test_installed_wheel_trains_from_another_directory(wheel_venv, scientific_dir, tmp_path):
    env_dir, _ = wheel_venv
    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=60, name="Scientific")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("RECBOLE_MM_DATA", "PYTHONPATH")}
    args = ["--model=MMSASRec", "--dataset=Scientific", f"--data_path={tmp_path / 'data'}", "--epochs=1",
            "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--show_progress=False"]
    where = run_checked([str(env_dir / "bin" / "python"), "-c", "import recbole_mm; print(recbole_mm.__file__)"],
                        cwd=work, env=env).stdout
    assert str(env_dir) in where  # the wheel, not the checkout
    done = run_checked([str(env_dir / "bin" / "python"), "-m", "recbole_mm", *args], cwd=work, env=env)
    assert "[recbole-mm] model=MMSASRec dataset=Scientific" in done.stdout
    done = run_checked([str(env_dir / "bin" / "recbole-mm"), *args, "--seed=7"], cwd=work, env=env)
    assert "test={'recall@10'" in done.stdout


def test_default_dataset_is_built_on_first_use_offline(in_tmp_cwd, monkeypatch):
    """No shared data and no network: --dataset=ml-100k-mm builds itself under ./dataset."""
    from recbole_mm.quick_start.cli import main

    monkeypatch.delenv("RECBOLE_MM_DATA")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    args = ["--model=MMSASRec", "--dataset=ml-100k-mm", "--epochs=1", "--hidden_size=16", "--inner_size=32",
            "--n_layers=1", "--show_progress=False", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=4096",
            "--eval_batch_size=4096"]
    assert main(args) == 0
    folder = in_tmp_cwd / "dataset" / "ml-100k-mm"
    assert {f"ml-100k-mm.{suffix}" for suffix in ("inter", "item", "text.npy", "genre.npy")} <= {
        path.name for path in folder.iterdir()}
