"""One writer per output folder: the table runner and the tuner hold ``<output>/.lock`` while they run.

The lock is an ``flock`` on that file, so the operating system releases it when the holder exits,
however it exits (``kill -9`` included): a stale lock never blocks the next run.
"""
import contextlib
import fcntl
import os
import time
from pathlib import Path

from recbole_mm.utils.utils import RecboleMMError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def output_lock(folder, command):
    """Hold ``<folder>/.lock`` for the block; a second holder gets a RecboleMMError at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RecboleMMError(
                f"{folder} is in use by {holder}: two runs writing one output folder would overwrite each "
                f"other's files. Wait for that run to finish, or give this one another --output."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the flock
