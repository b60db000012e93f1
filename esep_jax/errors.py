"""User-facing errors.

Anything a user can cause with bad input (a malformed file, an unknown id, a bad override) raises
`InputError`. The CLI prints it as one line and exits with status 2; every other exception is a bug.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input, reported as `file: line N: field: message` on one line.

    `line` is a 1-based line of a text file; `row` a 0-based row of an array (as numpy indexes it).
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 line: int | None = None, field: str | None = None):
        where = [file, None if line is None else f"line {line}", None if row is None else f"row {row}", field]
        super().__init__(": ".join([str(p) for p in where if p is not None] + [message]))
        self.file, self.row, self.line, self.field = file, row, line, field
