"""One trainer per workdir: an exclusive advisory lock held for the whole run.

`flock` locks vanish with the process that holds them, so a crashed or killed trainer never leaves a stale
lock behind; a second trainer on the same workdir is refused at once instead of interleaving checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from esep_jax.errors import InputError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Holds the workdir's lock for the block; refuses with an InputError if another process holds it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise InputError(f"in use by another trainer (pid {owner}); wait for it or use another --workdir",
                             file=str(workdir)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock
