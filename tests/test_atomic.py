"""Atomic writes: a write interrupted at any point (exception, or the process killed with SIGKILL)
leaves the previous file complete and loadable, and no temporary file behind (or one that is
never read)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from recbole_mm.utils import atomic
from recbole_mm.utils.atomic import atomic_path, torch_save_atomic
from tests.conftest import PROJECT_ROOT


def previous_and_next():
    return {"epoch": 0, "weights": torch.arange(1000.0)}, {"epoch": 1, "weights": torch.arange(1000.0) * 2}


def test_completed_write_replaces_the_file(tmp_path):
    old, new = previous_and_next()
    target = tmp_path / "model.pth"
    torch_save_atomic(old, target)
    torch_save_atomic(new, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_exception_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old, new = previous_and_next()
    target = tmp_path / "model.pth"
    torch_save_atomic(old, target)
    real_save = torch.save

    def disk_full_halfway(obj, file):
        real_save(obj, file)
        size = os.path.getsize(file)
        with open(file, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        torch_save_atomic(new, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], old["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from recbole_mm.utils import atomic
    point, target = sys.argv[1], sys.argv[2]
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    real_save = torch.save
    if point == "mid_write":      # half the bytes are on disk when the process dies
        def save(obj, file):
            real_save(obj, file)
            with open(file, "r+b") as handle:
                handle.truncate(os.path.getsize(file) // 2)
            die()
        torch.save = save
    elif point == "before_fsync":
        atomic._fsync_file = die
    elif point == "before_rename":
        atomic.os.replace = die
    atomic.torch_save_atomic({"epoch": 1, "weights": torch.arange(1000.0) * 2}, target)
""")


@pytest.mark.parametrize("point", ["mid_write", "before_fsync", "before_rename"])
def test_sigkill_mid_write_keeps_the_previous_checkpoint(tmp_path, point):
    old, _ = previous_and_next()
    target = tmp_path / "model.pth"
    torch_save_atomic(old, target)
    child = subprocess.run([sys.executable, "-c", CHILD, point, str(target)], cwd=PROJECT_ROOT,
                           env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["weights"], old["weights"])


def test_the_temporary_file_is_in_the_target_folder(tmp_path):
    """os.replace is atomic only within one file system: the temporary file must sit beside the target."""
    target = tmp_path / "sub" / "cell.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("{}")
    assert target.read_text() == "{}"


def test_directory_is_synced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "_fsync_directory", lambda folder: synced.append(folder))
    torch_save_atomic({"x": 1}, tmp_path / "a.pth")
    assert synced == [tmp_path]
