"""User-facing errors, each printed by the CLI as one line (never a traceback).

- `InputError`: bad input a user can fix (a malformed file, an unknown id, a bad override, a run that would
  not fit in memory); exit status 2.
- `StorageError`: the machine could not store something (a full disk, a quota, a lost mount); what was saved
  before is intact; exit status 1. `storage_errors(what)` turns OSError (and tensorstore's I/O errors) raised
  inside it into one.
- `TrainingError`: training cannot go on (a non-finite loss or parameters); the last good checkpoint is kept;
  exit status 1.
Every other exception is a bug.
"""

from __future__ import annotations

import contextlib

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class InputError(Exception):
    """Bad user input, reported as `file: line N: field: message` on one line.

    `line` is a 1-based line of a text file; `row` a 0-based row of an array (as numpy indexes it).
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 line: int | None = None, field: str | None = None):
        where = [file, None if line is None else f"line {line}", None if row is None else f"row {row}", field]
        super().__init__(": ".join([str(p) for p in where if p is not None] + [message]))
        self.file, self.row, self.line, self.field = file, row, line, field


class StorageError(RuntimeError):
    """Something could not be written (or read back) by the machine; earlier results are intact."""


class TrainingError(RuntimeError):
    """Training stopped because it cannot continue correctly (non-finite values); nothing bad was saved."""


def os_reason(error: BaseException) -> str:
    """The operating system's own words for an I/O error (tensorstore wraps them in long messages)."""
    reason = " ".join(str(error).split())
    if "os_error_code" in reason:
        reason = reason[reason.rfind(": ", 0, reason.rfind("[os_error_code")) + 2:]
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror + (f": {error.filename}" if error.filename else "")
    return reason[:300]


def is_storage_failure(error: BaseException) -> bool:
    """An OSError, or a tensorstore error that reports one (tensorstore raises ValueError with the OS's code)."""
    return isinstance(error, OSError) or (isinstance(error, ValueError) and "os_error_code" in str(error))


@contextlib.contextmanager
def storage_errors(what: str):
    """Re-raises storage failures inside the block as one `StorageError`: `could not write WHAT: reason`."""
    try:
        yield
    except (OSError, ValueError) as error:
        if not is_storage_failure(error):
            raise
        raise StorageError(f"could not write {what}: {os_reason(error)}") from None
