"""The bundle's optional document store: each corpus row's title and text, read one document at a time.

On disk (`esep_jax.export.format`): `documents.jsonl`, one JSON object `{"id", "title", "text"}` per corpus row
in the bundle's row order (JSON escapes newlines, so a record is one line whatever its text), and
`documents.offsets.npy`, int64 `[N + 1]`, where record r is the bytes `offsets[r]:offsets[r + 1]`. A server reads
only the documents it returns (`pread` at the offset) instead of holding the corpus in memory; both files are
listed with their sha256 in the manifest like every other bundle file, so `Searcher.load` verifies them.

Numpy and the standard library only (the serving path stays JAX-free).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from esep_jax.export import format as fmt
from esep_jax.serving.errors import BundleError

# A store with no rows returned by a search still answers; beyond this a single record is surely damage.
MAX_RECORD_BYTES = 1 << 28


def write_documents(root: Path, ids: list[str], titles: list[str], texts: list[str], source: str) -> dict:
    """Writes `documents.jsonl` and its offsets under `root` (rows in the order of `ids`); returns the
    manifest's `documents` entry. `source` names the file the texts came from (recorded, not read)."""
    offsets = np.zeros(len(ids) + 1, np.int64)
    position = 0
    with open(root / fmt.DOCUMENTS_FILE, "wb") as handle:
        for row, (doc_id, title, text) in enumerate(zip(ids, titles, texts, strict=True)):
            line = (json.dumps({"id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n").encode()
            handle.write(line)
            position += len(line)
            offsets[row + 1] = position
    np.save(root / fmt.DOCUMENT_OFFSETS_FILE, offsets, allow_pickle=False)
    return {"path": fmt.DOCUMENTS_FILE, "offsets": fmt.DOCUMENT_OFFSETS_FILE, "count": len(ids),
            "source": source, "fields": ["title", "text"]}


class DocumentStore:
    """Reads documents by corpus row from a loaded bundle. Thread-safe: every read opens and `pread`s."""

    def __init__(self, path: Path, offsets: np.ndarray, ids: list[str]):
        self.path, self.offsets, self.ids = path, offsets, ids

    @classmethod
    def open(cls, root: Path, entry: dict, ids: list[str]) -> "DocumentStore":
        """Checks the store against the manifest entry and the bundle's ids; a `BundleError` naming the file."""
        manifest_path = str(root / fmt.MANIFEST)
        if not isinstance(entry, dict) or entry.get("path") != fmt.DOCUMENTS_FILE or \
                entry.get("offsets") != fmt.DOCUMENT_OFFSETS_FILE:
            raise BundleError(f"must name {fmt.DOCUMENTS_FILE!r} and {fmt.DOCUMENT_OFFSETS_FILE!r}",
                              file=manifest_path, field="documents")
        if entry.get("count") != len(ids):
            raise BundleError(f"count {entry.get('count')!r} != the bundle's {len(ids)} documents",
                              file=manifest_path, field="documents.count")
        path, offsets_path = root / fmt.DOCUMENTS_FILE, root / fmt.DOCUMENT_OFFSETS_FILE
        try:
            offsets = np.load(offsets_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise BundleError(f"cannot read as .npy: {error}", file=str(offsets_path)) from None
        if offsets.dtype != np.int64 or offsets.shape != (len(ids) + 1,):
            raise BundleError(f"is {offsets.dtype}{list(offsets.shape)}, expected int64[{len(ids) + 1}]",
                              file=str(offsets_path))
        size = path.stat().st_size if path.is_file() else -1
        if offsets[0] != 0 or offsets[-1] != size or (np.diff(offsets) <= 0).any():
            raise BundleError(f"offsets do not cut {fmt.DOCUMENTS_FILE} ({size} bytes) into {len(ids)} records",
                              file=str(offsets_path))
        if int(np.diff(offsets).max(initial=0)) > MAX_RECORD_BYTES:
            raise BundleError(f"a record longer than {MAX_RECORD_BYTES} bytes", file=str(offsets_path))
        return cls(path, offsets, ids)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, rows) -> list[dict | None]:
        """`{"title", "text"}` of each corpus row (`None` for a row < 0: a result slot with no document)."""
        rows = [int(r) for r in np.asarray(rows).reshape(-1)]
        out: list[dict | None] = []
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            for row in rows:
                if row < 0:
                    out.append(None)
                    continue
                start, end = int(self.offsets[row]), int(self.offsets[row + 1])
                out.append(self._parse(row, os.pread(descriptor, end - start, start)))
        finally:
            os.close(descriptor)
        return out

    def _parse(self, row: int, raw: bytes) -> dict:
        # Checked per record: with checksums skipped at load (`verify_checksums=False`) a damaged store would
        # otherwise hand out another document's text.
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("id") != self.ids[row]:
            raise BundleError(f"record {row} is not the document {self.ids[row]!r}: the file is damaged",
                              file=str(self.path))
        return {"title": record.get("title", ""), "text": record.get("text", "")}
