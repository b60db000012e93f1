"""Reading BEIR text: `corpus.jsonl`, `queries.jsonl` (optionally gzipped), one JSON object per line.

Every problem names the file and line: invalid UTF-8 or JSON, a missing or malformed `_id` (ids are checked
like every ingest path's, `ids.py`), a missing or non-string `text` or `title`, a duplicate id. A text longer
than `MAX_TEXT_CHARS` is cut there before encoding: encoders read a few hundred tokens (all-MiniLM-L6-v2: 256),
and tokenising a 50 MB line whole would cost gigabytes of memory for nothing. `read_beir_documents` keeps title
and text apart and uncut, for a bundle's document store (nothing is encoded from it).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

from esep_jax.data.ids import check_id
from esep_jax.errors import InputError

MAX_TEXT_CHARS = 20_000  # ~ 20× what a 256-token encoder reads


def _records(path: str, with_title: bool):
    """Yields (line, id, title, text) of each record of a `.jsonl` / `.jsonl.gz` file, failing on the first
    bad line (title is "" without `with_title`); raises for a file with no records."""
    opener = gzip.open if path.endswith(".gz") else open
    first_line: dict[str, int] = {}
    try:
        with opener(path, "rb") as lines:
            for n, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise InputError(f"not UTF-8 ({error.reason} at byte {error.start})", file=path, line=n) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"invalid JSON ({error.msg})", file=path, line=n) from None
                if not isinstance(record, dict):
                    raise InputError(f"expected a JSON object, got {type(record).__name__}", file=path, line=n)
                if "_id" not in record:
                    raise InputError("missing field", file=path, line=n, field="_id")
                doc_id = record["_id"]
                # Some BEIR exports write numeric ids; they are ids all the same.
                if isinstance(doc_id, int) and not isinstance(doc_id, bool):
                    doc_id = str(doc_id)
                if not isinstance(doc_id, str):
                    raise InputError(f"expected a string, got {doc_id!r}", file=path, line=n, field="_id")
                check_id(doc_id, file=path, line=n, field="_id")
                if doc_id in first_line:
                    raise InputError(f"duplicate id {doc_id!r} (first on line {first_line[doc_id]})", file=path,
                                     line=n, field="_id")
                first_line[doc_id] = n
                if "text" not in record:
                    raise InputError(f"missing field (id {doc_id!r})", file=path, line=n, field="text")
                text = record["text"]
                if not isinstance(text, str):
                    raise InputError(f"expected a string, got {type(text).__name__} (id {doc_id!r})", file=path,
                                     line=n, field="text")
                title = ""
                if with_title:
                    title = record.get("title") or ""
                    if not isinstance(title, str):
                        raise InputError(f"expected a string, got {type(title).__name__}", file=path, line=n,
                                         field="title")
                yield n, doc_id, title, text
    except OSError as error:  # includes gzip's BadGzipFile
        raise InputError(f"cannot read: {error}", file=path) from None
    if not first_line:
        raise InputError("no records", file=path)


def _read_jsonl(path: str | Path, with_title: bool) -> tuple[list[str], list[str], int]:
    """(ids, texts, texts cut) of a `.jsonl` or `.jsonl.gz` file, failing on the first bad line."""
    ids: list[str] = []
    texts: list[str] = []
    cut = 0
    for _, doc_id, title, text in _records(str(path), with_title):
        if with_title:
            text = (title + " " + text).strip()
        if len(text) > MAX_TEXT_CHARS:
            text, cut = text[:MAX_TEXT_CHARS], cut + 1
        ids.append(doc_id)
        texts.append(text)
    return ids, texts, cut


@dataclasses.dataclass
class BeirDocuments:
    """A BEIR corpus with title and text kept apart and uncut (for a document store), in file order."""

    ids: list[str]
    titles: list[str]
    texts: list[str]
    lines: list[int]  # the 1-based line of each record, for errors that name it


def read_beir_documents(path: str | Path) -> BeirDocuments:
    """Every record of a BEIR `corpus.jsonl(.gz)`, checked as `read_beir_corpus` checks them, with title and
    text separate and not cut (a document store returns what the user stored; nothing is encoded here)."""
    documents = BeirDocuments([], [], [], [])
    for n, doc_id, title, text in _records(str(path), with_title=True):
        documents.ids.append(doc_id)
        documents.titles.append(title)
        documents.texts.append(text)
        documents.lines.append(n)
    return documents


def read_beir_corpus(path: str | Path) -> tuple[list[str], list[str], int]:
    """Ids, texts (`(title + " " + text).strip()`, as MTEB encodes BEIR corpora) and how many were cut."""
    return _read_jsonl(path, with_title=True)


def read_beir_queries(path: str | Path) -> tuple[list[str], list[str], int]:
    """Ids, texts and how many were cut."""
    return _read_jsonl(path, with_title=False)
