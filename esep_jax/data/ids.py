"""Document and query ids: what every ingest path accepts.

Ids are stored one per line and written into TREC run files as whitespace-separated fields, so an id holding a
line break (including U+2028 and the other separators `str.splitlines` honours), a tab, a space or another
invisible control character would shift every row after it or corrupt a run. Such ids are refused at ingest,
wherever they come from (an id file, BEIR jsonl, qrels), with the file, line and field.
"""

from __future__ import annotations

import unicodedata

from esep_jax.errors import InputError

# Unicode categories refused inside an id: controls, formats (zero-width), surrogates, separators.
_REFUSED_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp", "Zs")
MAX_ID_LENGTH = 1000


def check_id(identifier: str, *, file: str, line: int | None = None, row: int | None = None,
             field: str | None = None) -> str:
    """Returns `identifier` if it is a usable id, else raises an InputError naming where it came from."""
    if not identifier.strip():
        raise InputError("empty id", file=file, line=line, row=row, field=field)
    if len(identifier) > MAX_ID_LENGTH:
        raise InputError(f"id of {len(identifier)} characters (at most {MAX_ID_LENGTH})", file=file, line=line,
                         row=row, field=field)
    for position, character in enumerate(identifier):
        if character.isspace() or unicodedata.category(character) in _REFUSED_CATEGORIES:
            name = unicodedata.name(character, f"U+{ord(character):04X}")
            raise InputError(f"id {identifier[:60]!r} contains {name} at position {position} (ids may not hold "
                             "whitespace, line breaks or control characters)", file=file, line=line, row=row,
                             field=field)
    return identifier


def read_ids(path: str) -> list[str]:
    """One id per line (`\\n` or `\\r\\n`); empty, malformed and duplicate ids are errors naming the line."""
    try:
        text = open(path, "rb").read().decode("utf-8")
    except OSError as error:
        raise InputError(f"cannot read ids: {error.strerror or error}", file=path) from None
    except UnicodeDecodeError as error:
        line = text_line_of(open(path, "rb").read(), error.start)
        raise InputError(f"not UTF-8 ({error.reason})", file=path, line=line) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    seen: dict[str, int] = {}
    for line_number, raw in enumerate(lines, start=1):
        identifier = raw[:-1] if raw.endswith("\r") else raw
        check_id(identifier, file=path, line=line_number)
        if identifier in seen:
            raise InputError(f"duplicate id {identifier!r} (first on line {seen[identifier]})", file=path,
                             line=line_number)
        seen[identifier] = line_number
    if not seen:
        raise InputError("no ids", file=path)
    return list(seen)


def text_line_of(data: bytes, offset: int) -> int:
    """The 1-based line of byte `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1


def text_lines(path: str, what: str) -> list[str]:
    """A text file's lines split on `\n` alone (an id with U+2028 must not become two lines)."""
    try:
        data = open(path, "rb").read()
    except OSError as error:
        raise InputError(f"cannot read {what}: {error.strerror or error}", file=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"not UTF-8 ({error.reason})", file=path, line=text_line_of(data, error.start)) from None
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
