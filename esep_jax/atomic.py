"""Writes that are all-or-nothing: a crash or a bad input never leaves a half-written artifact.

Everything is built under a temporary sibling path and renamed into place only when complete; rename is
atomic within one filesystem, so readers see either nothing or the whole thing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from esep_jax.errors import InputError


@contextlib.contextmanager
def atomic_directory(out: Path | str, overwrite: bool = False):
    """Yields a temporary directory that becomes `out` if the block succeeds and vanishes if it fails."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError("already exists (pass --overwrite to replace it)", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Move the old one aside first so `out` is never missing a consistent version for long.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Writes a text file via a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary result files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
