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


def test_figure_interrupted_mid_write_keeps_the_previous_image(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recbole_mm.utils.atomic import save_figure_atomic

    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    target = tmp_path / "ndcg_at_10.png"
    save_figure_atomic(figure, target)
    previous = target.read_bytes()
    assert previous.startswith(b"\x89PNG")  # the format comes from the final name, not the temporary one
    real_savefig = figure.savefig

    def disk_full_halfway(file, **kwargs):
        real_savefig(file, **kwargs)
        with open(file, "r+b") as handle:
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figure, "savefig", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        save_figure_atomic(figure, target)
    plt.close(figure)
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["ndcg_at_10.png"]


# Files opened for writing on purpose without the helper, with the reason.
NOT_ATOMIC = {
    "recbole_mm/utils/lock.py": "the lock file is held open for flock; its text only names the holder",
    "benchmarks/bench_mmesid.py": "a child process's log, streamed while it runs",
}


def direct_writes(path, root=PROJECT_ROOT):
    """Lines of ``path`` that write a file (write_text/write_bytes, open for writing, savefig, torch.save,
    np.save, shutil.copy*) onto anything but a name bound by ``atomic_path`` / ``open_atomic`` (or a
    file opened on such a name)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def called(node):
        if isinstance(node, ast.Call):
            return getattr(node.func, "id", None) or getattr(node.func, "attr", None)

    def atomic_names(node):
        enclosing = []
        while node in parents:
            node = parents[node]
            enclosing.append(node)
        names = set()
        for node in reversed(enclosing):  # outermost first: ``open(tmp)`` inside ``atomic_path(...) as tmp``
            for item in node.items if isinstance(node, ast.With) else []:
                context = item.context_expr
                via_open = called(context) == "open" and context.args and is_atomic(context.args[0], names)
                if isinstance(item.optional_vars, ast.Name) and (called(context) in ("atomic_path", "open_atomic")
                                                                 or via_open):
                    names.add(item.optional_vars.id)
        return names

    def is_atomic(target, names):
        while called(target) in ("Path", "str") and target.args:
            target = target.args[0]
        if isinstance(target, ast.Constant) and str(target.value).startswith(("/proc/", "/sys/")):
            return True  # a kernel control file (e.g. resetting the peak RSS): no file is written
        return isinstance(target, ast.Name) and target.id in names

    hits = []
    for node in ast.walk(tree):
        name, func = called(node), getattr(node, "func", None)
        owner = getattr(getattr(func, "value", None), "id", None)
        if name in ("write_text", "write_bytes") and isinstance(func, ast.Attribute):
            target = func.value
        elif name == "savefig":
            target = node.args[0] if node.args else None
        elif name == "open" and isinstance(func, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and set(mode.value) & set("wax+")):
                continue
            target = node.args[0]
        elif name == "save" and owner in ("torch", "np", "numpy"):
            target = node.args[1] if owner == "torch" else node.args[0]
        elif name in ("copy", "copyfile", "copy2") and owner == "shutil":
            target = node.args[1]
        else:
            continue
        if not is_atomic(target, atomic_names(node)):
            hits.append(f"{path.relative_to(root)}:{node.lineno}")
    return hits


def test_every_file_the_project_writes_goes_through_the_atomic_helper():
    """Checkpoints, result stores, tables, figures, converter outputs, downloaded images, benchmark
    reports: a kill mid-write must never leave a half file under the final name."""
    hits = []
    for folder in ("recbole_mm", "dataset_conversion", "benchmarks"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            relative = str(path.relative_to(PROJECT_ROOT))
            if relative != "recbole_mm/utils/atomic.py" and relative not in NOT_ATOMIC:
                hits += direct_writes(path)
    assert not hits, f"written in place (use recbole_mm.utils.atomic): {hits}"


def test_the_direct_write_scan_finds_each_kind_of_write(tmp_path):
    """The scan itself: each way of writing is found, and the atomic forms are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        def bad(path, figure, obj, array):
            path.write_text("x")
            open(path, "w")
            figure.savefig(path)
            torch.save(obj, path)
            np.save(path, array)
            shutil.copyfile(path, path)
        def good(path, figure, obj):
            with atomic_path(path) as tmp:
                Path(tmp).write_text("x")
                figure.savefig(tmp)
                torch.save(obj, tmp)
                with open(tmp, "wb") as handle:
                    np.save(handle, obj)
            with open_atomic(path) as handle:
                handle.write("x")
            open(path)
            Path("/proc/self/clear_refs").write_text("5")
            Path("/procfs-backup/x").write_text("5")
    """))
    assert [hit.split(":")[1] for hit in direct_writes(sample, tmp_path)] == ["3", "4", "5", "6", "7", "8", "20"]
