"""The on-disk dataset: tensorstore (zarr v3) arrays plus a `dataset.json` manifest.

Layout of a dataset directory (or a `gs://` / `s3://` / `file://` URL, read through tensorstore kvstores):

    dataset.json                     manifest: format version, dims, dtypes, encoder, prompts, counts, splits
    corpus/embeddings                zarr3 [N, d_corpus], chunked by rows for streaming
    queries/embeddings               zarr3 [Q, d_query]
    corpus_ids.txt, query_ids.txt    one id per line, in row order
    qrels/<split>/query_rows         zarr3 int32 [Q_s]     row of each judged query in queries/embeddings
    qrels/<split>/offsets            zarr3 int64 [Q_s + 1] CSR offsets into doc_rows / grades
    qrels/<split>/doc_rows           zarr3 int32 [nnz]     corpus rows judged for the query
    qrels/<split>/grades             zarr3 int32 [nnz]     graded relevance (<= 0: judged non-relevant)
    queries/targets                  optional zarr3 [Q, d_corpus]: a target vector per query (query drift:
                                     the old encoder's embedding of the same query text)
    paired/source, paired/target     optional zarr3 [P, d_query], [P, d_corpus]: unlabelled texts embedded
                                     by the query encoder and by the corpus encoder (distillation pairs)
    candidates/<name>/...            optional per-query candidate lists (mined negatives, teacher scores)

Qrels are CSR so a loader addresses "the i-th judged query of a split and all its judgements" by integer
index; they are small and read whole, while embeddings stay in tensorstore and are read by row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorstore as ts

from esep_jax.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# About 4 MiB per chunk: large enough for throughput, small enough to stream and to read a batch's rows.
TARGET_CHUNK_BYTES = 4 << 20


def is_test_split(name: str) -> bool:
    """`test`, and a mixture's per-source `test.NAME`: the splits export never reads and new-documents datasets
    keep whole."""
    return name == "test" or name.startswith("test.")


def kvstore_spec(location: str) -> dict:
    """A tensorstore kvstore spec for a local path or a `gs://`, `s3://`, `file://` URL (a directory)."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    elif "://" in location:
        return _cloud_spec(location)
    # abspath, not Path.absolute: `..` must be resolved (tensorstore refuses file paths that contain it).
    return {"driver": "file", "path": os.path.abspath(location) + "/"}


def _cloud_spec(url: str) -> dict:
    scheme, rest = url.split("://", 1)
    bucket, _, path = rest.partition("/")
    if scheme not in ("gs", "s3"):
        raise InputError(f"unsupported URL scheme {scheme!r} (use a path, file://, gs:// or s3://)", file=url)
    driver = "gcs" if scheme == "gs" else "s3"
    return {"driver": driver, "bucket": bucket, "path": path.rstrip("/") + "/" if path else ""}


def _child(spec: dict, key: str) -> dict:
    return {**spec, "path": spec["path"] + key}


def zarr_spec(location_spec: dict, key: str) -> dict:
    return {"driver": "zarr3", "kvstore": _child(location_spec, key)}


def chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(1, TARGET_CHUNK_BYTES // max(1, dim * itemsize)))


def create_array(directory: Path, key: str, shape: tuple[int, ...], dtype: str) -> tuple[ts.TensorStore, int]:
    """A new zarr3 array of a 1-D or 2-D shape, chunked by rows (~4 MiB chunks); returns it and its chunk rows."""
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    dim = shape[1] if len(shape) == 2 else 1
    rows = min(max(1, shape[0]), chunk_rows(dim, itemsize))
    store = ts.open({
        **zarr_spec(kvstore_spec(str(directory)), key),
        "metadata": {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows, *shape[1:]]}},
            "data_type": dtype,
        },
    }, create=True, delete_existing=True).result()
    return store, rows


def write_array(directory: Path, key: str, values: np.ndarray, dtype: str | None = None, hasher=None) -> None:
    """Writes a 1-D or 2-D array as zarr3, chunked by rows. `values` may be a memory map.

    `hasher` (a hashlib object) is fed the key, shape and stored bytes: the dataset's content fingerprint."""
    store, rows = create_array(directory, key, tuple(values.shape), dtype or values.dtype.name)
    if hasher is not None:
        hasher.update(f"{key}|{store.dtype.name}|{tuple(values.shape)}|".encode())
    # Copy in row blocks so a memory-mapped input never has to fit in memory at once.
    for start in range(0, values.shape[0], rows * 16):
        block = np.asarray(values[start:start + rows * 16]).astype(store.dtype.numpy_dtype)
        store[start:start + block.shape[0]].write(block).result()
        if hasher is not None:
            hasher.update(np.ascontiguousarray(block).tobytes())


@dataclasses.dataclass(frozen=True)
class Qrels:
    """Judgements of one split in CSR form (rows index the dataset's query and corpus tables)."""

    query_rows: np.ndarray  # int32 [Q_s]
    offsets: np.ndarray  # int64 [Q_s + 1]
    doc_rows: np.ndarray  # int32 [nnz]
    grades: np.ndarray  # int32 [nnz]

    @property
    def num_queries(self) -> int:
        return int(self.query_rows.shape[0])

    def judgements(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc_rows, grades) judged for the i-th query of the split."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.doc_rows[start:end], self.grades[start:end]

    def subset(self, indices: np.ndarray) -> "Qrels":
        """The qrels of the given queries (indices into this split), in that order."""
        return Qrels.from_lists(self.query_rows[indices], [self.judgements(int(i)) for i in indices])

    @staticmethod
    def from_lists(query_rows, judgements: list[tuple[np.ndarray, np.ndarray]]) -> "Qrels":
        """CSR qrels from per-query (doc_rows, grades) pairs."""
        lengths = np.array([len(docs) for docs, _ in judgements], dtype=np.int64)
        return Qrels(
            query_rows=np.asarray(query_rows, dtype=np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_rows=np.concatenate([d for d, _ in judgements] or [np.zeros(0)]).astype(np.int32),
            grades=np.concatenate([g for _, g in judgements] or [np.zeros(0)]).astype(np.int32),
        )


def write_qrels(directory: Path, split: str, qrels: Qrels, hasher=None) -> None:
    for name in ("query_rows", "offsets", "doc_rows", "grades"):
        write_array(directory, f"qrels/{split}/{name}", getattr(qrels, name), hasher=hasher)


def write_ids(directory: Path, name: str, ids: list[str], hasher=None) -> None:
    """An id file, one id per line (ids are checked at ingest to hold no line breaks or whitespace)."""
    text = "\n".join(ids) + "\n"
    (directory / name).write_text(text, encoding="utf-8")
    if hasher is not None:
        hasher.update(f"{name}|".encode() + text.encode("utf-8"))


class Dataset:
    """A read-only handle on a dataset directory or URL. Embedding tables are opened lazily."""

    def __init__(self, location: str):
        location = str(location)
        self.location = location if "://" in location else os.path.abspath(location)
        self._spec = kvstore_spec(self.location)
        self._kvstore = ts.KvStore.open(self._spec).result()
        raw = self._read_bytes(MANIFEST, required=True)
        try:
            self.manifest = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InputError(f"invalid JSON: {error}", file=f"{self.location}/{MANIFEST}") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"unsupported format_version {version!r} (this esep_jax reads {FORMAT_VERSION})",
                             file=f"{self.location}/{MANIFEST}", field="format_version")
        self._tables: dict[str, ts.TensorStore] = {}
        self._ids: dict[str, list[str]] = {}
        self._qrels: dict[str, Qrels] = {}

    def _read_bytes(self, key: str, required: bool = False) -> bytes | None:
        result = self._kvstore.read(key).result()
        if result.state != "value":
            if required:
                raise InputError("not found (is this an esep-jax dataset? see `esep-jax ingest`)",
                                 file=f"{self.location}/{key}")
            return None
        return bytes(result.value)

    def table(self, key: str) -> ts.TensorStore:
        """Any array of the dataset by key (e.g. `queries/targets`, `paired/source`), opened once."""
        return self._table(key)

    @property
    def has_query_targets(self) -> bool:
        """Whether `queries/targets` holds a target vector (e.g. the old encoder's embedding) per query."""
        return "query_targets" in self.manifest

    @property
    def num_paired(self) -> int:
        """Rows of `paired/source` and `paired/target`: unlabelled texts embedded by both encoders."""
        return int(self.manifest.get("paired", {}).get("count", 0))

    def _table(self, key: str) -> ts.TensorStore:
        if key not in self._tables:
            self._tables[key] = ts.open(zarr_spec(self._spec, key), open=True, read=True).result()
        return self._tables[key]

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    @property
    def corpus_dim(self) -> int:
        return int(self.manifest["corpus"]["dim"])

    @property
    def query_dim(self) -> int:
        return int(self.manifest["queries"]["dim"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["corpus"]["count"])

    def corpus_table(self) -> ts.TensorStore:
        """The corpus embeddings `[N, d]` as a tensorstore (read rows with `.read()` futures)."""
        return self._table("corpus/embeddings")

    def query_table(self) -> ts.TensorStore:
        """The query embeddings `[Q, d]` as a tensorstore; never needs to fit in memory."""
        return self._table("queries/embeddings")

    def read_corpus(self, dtype=np.float32) -> np.ndarray:
        """The whole corpus table in host memory (to place on the device once)."""
        return self.corpus_table().read().result().astype(dtype)

    def read_queries(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The given query rows, in the given order."""
        return self.query_table()[np.asarray(rows, dtype=np.int64)].read().result().astype(dtype)

    @property
    def new_documents(self) -> np.ndarray | None:
        """Corpus rows held out as "added after training" (`esep-jax new-documents`), or None."""
        if "new_documents" not in self.manifest:
            return None
        return self.table("documents/new").read().result().astype(np.int64)

    @property
    def fingerprint(self) -> str:
        """A hash of the dataset's content (embeddings, ids, qrels), written at ingest; a run records it so a
        workdir refuses other data at the same path. (Datasets from before fingerprints: the manifest's hash.)"""
        stored = self.manifest.get("fingerprint")
        if isinstance(stored, str):
            return stored
        return "manifest-" + hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def ids(self, table: str) -> list[str]:
        """Ids of `corpus` or `queries` rows, in row order."""
        if table not in self._ids:
            name = {"corpus": "corpus_ids.txt", "queries": "query_ids.txt"}[table]
            try:
                text = self._read_bytes(name, required=True).decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"not UTF-8: {error}", file=f"{self.location}/{name}") from None
            # Split on "\n" alone: str.splitlines would also split inside an id at U+2028 and other separators.
            ids = text.split("\n")
            if ids and ids[-1] == "":
                ids.pop()
            expected = self.manifest[table]["count"]
            if len(ids) != expected:
                raise InputError(f"{len(ids)} ids, the manifest says {expected} rows", file=f"{self.location}/{name}")
            self._ids[table] = ids
        return self._ids[table]

    def qrels(self, split: str) -> Qrels:
        """The CSR judgements of a split."""
        if split not in self.manifest["splits"]:
            raise InputError(f"no split {split!r} (splits: {', '.join(self.splits) or 'none'})",
                             file=f"{self.location}/{MANIFEST}", field="splits")
        if split not in self._qrels:
            parts = {name: self._table(f"qrels/{split}/{name}").read().result()
                     for name in ("query_rows", "offsets", "doc_rows", "grades")}
            self._qrels[split] = Qrels(**parts)
        return self._qrels[split]
