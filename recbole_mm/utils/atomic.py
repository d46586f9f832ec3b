"""Crash-safe file writing: a file under its final name is always complete, old or new.

Every file recbole-mm writes that a later run reads (checkpoints, result stores, tables, converter
outputs) goes through ``atomic_path``: the content is written to a temporary file in the same
folder, flushed to disk (fsync), renamed over the target (``os.replace``, atomic on POSIX and
Windows) and the folder entry is synced too. A kill, a full disk or an exception during the write
leaves the previous file untouched and no temporary file behind.
"""
import contextlib
import os
from pathlib import Path


def _fsync_file(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(folder):
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; rename is durable there
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; the block writes (and closes) it; on success it is
    synced and renamed onto ``path``, on any failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def open_atomic(path, mode="w", **kwargs):
    """``open()`` for writing whose file appears under ``path`` only once complete."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle


def torch_save_atomic(obj, path):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure_atomic(figure, path, **kwargs):
    """``figure.savefig`` through ``atomic_path``; the format comes from ``path``'s suffix, since the
    temporary name's suffix is not an image type."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


def copy_file_atomic(source, path):
    import shutil

    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
