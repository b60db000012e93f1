"""Candidate lists: per-query, fixed-width lists of corpus rows with a score, stored inside a dataset.

Two kinds share one format: mined hard negatives (`esep-jax mine`, scores = retrieval scores) and teacher
scores (`esep-jax teacher`, imported from a TSV). Layout inside a dataset directory:

    candidates/<name>/query_rows   zarr3 int32   [Q_s]     rows of the dataset's query table, unique
    candidates/<name>/doc_rows     zarr3 int32   [Q_s, K]  corpus rows, best first; -1 = padding (at the end)
    candidates/<name>/scores       zarr3 float32 [Q_s, K]  0.0 at padding
    candidates/<name>/info.json    a copy of the manifest entry (its write_id ties the arrays to the manifest)

and `dataset.json` lists them under `"candidates": {name: {"kind", "k", "queries", ..., "write_id"}}`.
Padding scores are 0, not NaN, so arithmetic on a padded row stays finite; `doc_rows >= 0` is the mask.

A write is all-or-nothing: the arrays are built in a hidden temporary directory, renamed into place, and only
then is the manifest rewritten (atomically); a failure at any step puts the previous version back. If the
process dies between the rename and the manifest rewrite, the write_id check refuses the mismatched pair on
read instead of serving new arrays under old provenance. Writers of one dataset are serialised by a `flock`
on the dataset directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import tensorstore as ts

from esep_jax.atomic import atomic_write_text
from esep_jax.data.dataset import MANIFEST, Dataset, kvstore_spec, write_array
from esep_jax.data.ids import text_lines
from esep_jax.errors import InputError

CANDIDATES_DIR = "candidates"
INFO_FILE = "info.json"
KINDS = ("negatives", "teacher")
ARRAYS = ("query_rows", "doc_rows", "scores")
PAD_ROW = -1
PAD_SCORE = 0.0
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_HEADER_WORDS = ("score", "scores", "relevance", "rel", "label")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: no field-wise == or hash
class Candidates:
    """Per-query candidate lists. Row i of `doc_rows`/`scores` belongs to query row `query_rows[i]`."""

    query_rows: np.ndarray  # int32 [Q_s], unique
    doc_rows: np.ndarray  # int32 [Q_s, K], -1 = padding
    scores: np.ndarray  # float32 [Q_s, K], 0 at padding
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        query_rows = np.asarray(self.query_rows, np.int32)
        doc_rows = np.asarray(self.doc_rows, np.int32)
        scores = np.asarray(self.scores, np.float32)
        if query_rows.ndim != 1 or doc_rows.ndim != 2 or doc_rows.shape != scores.shape \
                or doc_rows.shape[0] != query_rows.shape[0]:
            raise ValueError(f"shapes do not fit: query_rows {query_rows.shape}, doc_rows {doc_rows.shape}, "
                             f"scores {scores.shape} (want [Q_s], [Q_s, K], [Q_s, K])")
        if np.unique(query_rows).shape[0] != query_rows.shape[0]:
            raise ValueError("query_rows has duplicates")
        object.__setattr__(self, "query_rows", query_rows)
        object.__setattr__(self, "doc_rows", doc_rows)
        object.__setattr__(self, "scores", scores)

    @property
    def k(self) -> int:
        return int(self.doc_rows.shape[1])

    @property
    def num_queries(self) -> int:
        return int(self.query_rows.shape[0])

    @functools.cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.query_rows, kind="stable")
        return self.query_rows[order], order

    def lookup(self, query_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(doc_rows int32 [n, K], scores float32 [n, K]) for the given query rows, in their order.

        A query without a list gets a padding row (-1, 0).
        """
        query_rows = np.asarray(query_rows, np.int64).reshape(-1)
        sorted_rows, order = self._sorted
        if sorted_rows.shape[0] == 0:
            return (np.full((query_rows.shape[0], self.k), PAD_ROW, np.int32),
                    np.full((query_rows.shape[0], self.k), PAD_SCORE, np.float32))
        position = np.minimum(np.searchsorted(sorted_rows, query_rows), sorted_rows.shape[0] - 1)
        found = sorted_rows[position] == query_rows
        source = order[position]
        doc_rows = np.where(found[:, None], self.doc_rows[source], np.int32(PAD_ROW))
        scores = np.where(found[:, None], self.scores[source], np.float32(PAD_SCORE))
        return doc_rows.astype(np.int32), scores.astype(np.float32)


def candidate_names(dataset: Dataset | str) -> list[str]:
    """Names of the candidate lists a dataset's manifest lists (a Dataset or a dataset location)."""
    if not isinstance(dataset, Dataset):
        dataset = Dataset(str(dataset))
    return sorted(dataset.manifest.get("candidates", {}))


def check_name(name: str) -> str:
    """A list name becomes a directory name: letters, digits, `_ . -`, not starting with a dot."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"invalid candidates name {name!r} (letters, digits, _ . -; up to 100; no leading . or -)",
                         field="--name")
    return name


def read_candidates(dataset: Dataset, name: str, field: str = "candidates") -> Candidates:
    """The named candidate lists of a dataset, checked against the manifest and the dataset's tables
    (`field`: what asked for them, named in the error when there are none)."""
    manifest_file = f"{dataset.location}/{MANIFEST}"
    entries = dataset.manifest.get("candidates", {})
    if name not in entries:
        raise InputError(f"no candidates named {name!r} in the dataset (available: "
                         f"{', '.join(sorted(entries)) or 'none'})", file=manifest_file, field=field)
    entry = dict(entries[name])
    spec = kvstore_spec(dataset.location)
    prefix = f"{CANDIDATES_DIR}/{name}"
    arrays = {}
    for array in ARRAYS:
        try:
            arrays[array] = dataset.table(f"{prefix}/{array}").read().result()
        except ValueError as error:
            raise InputError(f"cannot read array: {str(error).splitlines()[0]}",
                             file=f"{dataset.location}/{prefix}/{array}") from None
    info_file = f"{dataset.location}/{prefix}/{INFO_FILE}"
    stored = ts.KvStore.open(spec).result().read(f"{prefix}/{INFO_FILE}").result()
    try:
        stored_id = json.loads(bytes(stored.value)).get("write_id") if stored.state == "value" else None
    except (json.JSONDecodeError, AttributeError):
        stored_id = None
    if stored_id != entry.get("write_id"):
        raise InputError(f"arrays do not belong to the manifest entry (write_id {stored_id!r} != "
                         f"{entry.get('write_id')!r}): a write was interrupted; rewrite {name!r} with --overwrite",
                         file=info_file, field="write_id")
    try:
        candidates = Candidates(**arrays, info=entry)
    except ValueError as error:
        raise InputError(str(error), file=f"{dataset.location}/{prefix}") from None
    _check_ranges(candidates, dataset, f"{dataset.location}/{prefix}")
    if (candidates.num_queries, candidates.k) != (entry.get("queries"), entry.get("k")):
        raise InputError(f"arrays are [{candidates.num_queries}, {candidates.k}] but the manifest says "
                         f"queries {entry.get('queries')}, k {entry.get('k')}", file=manifest_file,
                         field=f"candidates.{name}")
    return candidates


def _check_ranges(candidates: Candidates, dataset: Dataset, where: str) -> None:
    num_queries, num_documents = int(dataset.manifest["queries"]["count"]), dataset.num_documents
    bad = np.flatnonzero((candidates.query_rows < 0) | (candidates.query_rows >= num_queries))
    if bad.size:
        raise InputError(f"query row {candidates.query_rows[bad[0]]} outside [0, {num_queries})",
                         file=f"{where}/query_rows", row=int(bad[0]))
    bad = np.argwhere((candidates.doc_rows < PAD_ROW) | (candidates.doc_rows >= num_documents))
    if bad.size:
        raise InputError(f"corpus row {candidates.doc_rows[tuple(bad[0])]} outside [-1, {num_documents})",
                         file=f"{where}/doc_rows", row=int(bad[0][0]))
    bad = np.argwhere(~np.isfinite(candidates.scores))
    if bad.size:
        raise InputError("non-finite score", file=f"{where}/scores", row=int(bad[0][0]))


def _local_directory(location: str) -> Path:
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    elif "://" in location:
        raise InputError("writing candidates needs a local dataset directory (copy the dataset locally, write, "
                         "then upload it)", file=location)
    return Path(location)


@contextlib.contextmanager
def _dataset_write_lock(directory: Path):
    """An exclusive flock on the dataset directory itself (nothing left behind; released if we die)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_candidates(location: str, name: str, candidates: Candidates, info: dict | None = None, *,
                     overwrite: bool = False) -> dict:
    """Stores `candidates` as `candidates/<name>` of a local dataset and lists them in its manifest.

    The manifest entry is `candidates.info`, then `info`, plus `k`, `queries`, `created` and `write_id`;
    `kind` must be one of KINDS. Replacing an existing name needs `overwrite=True`. Returns the entry.
    A `Dataset` opened before the write keeps the old manifest: open a new one to read the lists.
    """
    check_name(name)
    directory = _local_directory(location)
    dataset = Dataset(str(directory))  # a readable dataset, or a clear error
    entry = {**candidates.info, **(info or {})}
    if entry.get("kind") not in KINDS:
        raise ValueError(f"candidates info needs kind in {KINDS}, got {entry.get('kind')!r}")
    if candidates.k < 1:
        raise InputError("candidate lists of width 0 cannot be stored", field="k")
    root = directory / CANDIDATES_DIR
    final = root / name
    _check_ranges(candidates, dataset, str(final))
    entry.update(k=candidates.k, queries=candidates.num_queries,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 write_id=uuid.uuid4().hex)
    manifest_path = directory / MANIFEST
    with _dataset_write_lock(directory):
        manifest = json.loads(manifest_path.read_text())  # fresh: another writer may have added a list
        listed = manifest.setdefault("candidates", {})
        if name in listed and not overwrite:
            raise InputError(f"candidates {name!r} already exist (pass --overwrite to replace them)",
                             file=str(final))
        created_root = not root.exists()
        root.mkdir(exist_ok=True)
        _remove_leftovers(root)  # of writers that died; safe, as we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        aside = None
        try:
            for array in ARRAYS:
                write_array(tmp, array, getattr(candidates, array))
            (tmp / INFO_FILE).write_text(json.dumps(entry, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the lists are ordinary dataset files
            if final.exists():  # listed, or an orphan of a write that died before its manifest update
                aside = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)) / name
                os.replace(final, aside)
            os.replace(tmp, final)
            try:
                listed[name] = entry
                atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
            except BaseException:
                os.replace(final, tmp)  # undo: the old arrays (if any) go back under the old entry
                raise
        except BaseException:
            if aside is not None and aside.exists():
                os.replace(aside, final)
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None:
                shutil.rmtree(aside.parent, ignore_errors=True)
            if created_root:
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    return entry


def _remove_leftovers(root: Path) -> None:
    for path in root.glob(".*"):
        if ".tmp-" in path.name or ".old-" in path.name:
            shutil.rmtree(path, ignore_errors=True)


def read_teacher_tsv(path: str, dataset: Dataset) -> Candidates:
    """Teacher scores from `query-id<TAB>corpus-id<TAB>score` lines (an optional BEIR-style header).

    Each query's list is sorted by descending score (ties: lower corpus row first) and padded to the longest.
    """
    lines = text_lines(str(path), "teacher scores")
    query_index = {qid: row for row, qid in enumerate(dataset.ids("queries"))}
    doc_index = {did: row for row, did in enumerate(dataset.ids("corpus"))}
    queries, docs, scores, line_numbers = [], [], [], []
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        columns = [c.strip() for c in (raw.split("\t") if "\t" in raw else raw.split())]
        if line_number == 1 and len(columns) == 3 and columns[2].lower() in _HEADER_WORDS:
            continue
        if len(columns) != 3:
            raise InputError(f"expected 3 columns (query-id, corpus-id, score), got {len(columns)}",
                             file=str(path), line=line_number)
        query_id, doc_id, score_text = columns
        if query_id not in query_index:
            raise InputError(f"unknown query id {query_id!r}", file=str(path), line=line_number, field="query-id")
        if doc_id not in doc_index:
            raise InputError(f"unknown corpus id {doc_id!r}", file=str(path), line=line_number, field="corpus-id")
        try:
            score = float(score_text)
        except ValueError:
            raise InputError(f"score {score_text!r} is not a number", file=str(path), line=line_number,
                             field="score") from None
        if not math.isfinite(score) or abs(score) > _FLOAT32_MAX:
            raise InputError(f"score {score_text!r} is not finite (in float32)", file=str(path),
                             line=line_number, field="score")
        queries.append(query_index[query_id])
        docs.append(doc_index[doc_id])
        scores.append(score)
        line_numbers.append(line_number)
    if not queries:
        raise InputError("no teacher scores", file=str(path))
    query_rows = np.asarray(queries, np.int64)
    doc_rows = np.asarray(docs, np.int64)
    score_values = np.asarray(scores, np.float32)
    line_numbers = np.asarray(line_numbers, np.int64)
    _refuse_duplicates(query_rows, doc_rows, line_numbers, dataset, path)
    return pack_lists(query_rows, doc_rows, score_values, info={"kind": "teacher", "source": str(path)})


def _refuse_duplicates(query_rows, doc_rows, line_numbers, dataset: Dataset, path) -> None:
    """Names the earliest line that repeats a (query, corpus) pair, and the line it first appeared on."""
    order = np.lexsort((line_numbers, doc_rows, query_rows))
    query_sorted, doc_sorted = query_rows[order], doc_rows[order]
    starts = np.ones(order.shape[0], bool)
    starts[1:] = (query_sorted[1:] != query_sorted[:-1]) | (doc_sorted[1:] != doc_sorted[:-1])
    if starts.all():
        return
    group_start = np.maximum.accumulate(np.where(starts, np.arange(order.shape[0]), 0))
    repeats = np.flatnonzero(~starts)
    position = repeats[np.argmin(line_numbers[order[repeats]])]
    repeat, first = order[position], order[group_start[position]]
    raise InputError(f"duplicate pair ({dataset.ids('queries')[query_rows[repeat]]}, "
                     f"{dataset.ids('corpus')[doc_rows[repeat]]}) (first on line {line_numbers[first]})",
                     file=str(path), line=int(line_numbers[repeat]), field="corpus-id")


def pack_lists(query_rows: np.ndarray, doc_rows: np.ndarray, scores: np.ndarray, info: dict | None = None,
               width: int | None = None) -> Candidates:
    """Candidates from flat (query row, corpus row, score) triples: best score first, padded to `width`
    (default: the longest list). Pairs must be unique; triples beyond `width` are dropped."""
    query_rows, doc_rows = np.asarray(query_rows, np.int64), np.asarray(doc_rows, np.int64)
    scores = np.asarray(scores, np.float32)
    order = np.lexsort((doc_rows, -scores.astype(np.float64), query_rows))
    query_rows, doc_rows, scores = query_rows[order], doc_rows[order], scores[order]
    unique_queries, starts, counts = np.unique(query_rows, return_index=True, return_counts=True)
    width = int(counts.max(initial=0)) if width is None else width
    slot = np.arange(query_rows.shape[0]) - np.repeat(starts, counts)
    which = np.repeat(np.arange(unique_queries.shape[0]), counts)
    keep = slot < width
    packed_rows = np.full((unique_queries.shape[0], width), PAD_ROW, np.int32)
    packed_scores = np.full((unique_queries.shape[0], width), PAD_SCORE, np.float32)
    packed_rows[which[keep], slot[keep]] = doc_rows[keep]
    packed_scores[which[keep], slot[keep]] = scores[keep]
    return Candidates(unique_queries, packed_rows, packed_scores, dict(info or {}))
