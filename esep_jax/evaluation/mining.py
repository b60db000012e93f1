"""Hard-negative mining: one exact full-corpus retrieval pass over the judged queries of a split.

Per query the ranking is read top down; documents judged relevant to the query in any split are dropped
(`exclude_judged`), then the first `skip` of the rest (the skip guard: unjudged documents ranked near the
top are often unlabelled positives), and the next `k` are kept with their retrieval scores. With a run's
`workdir`, queries first go through that run's best head, so the negatives are hard for the trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from esep_jax.data.candidates import PAD_ROW, PAD_SCORE, Candidates
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.runs.trained_run import TrainedRun


def judged_keys(dataset: Dataset, relevance_level: int = 1) -> np.ndarray:
    """Sorted unique int64 keys `query_row * N + doc_row` of the pairs judged >= relevance_level in any split."""
    parts = []
    for split in dataset.splits:
        qrels = dataset.qrels(split)
        query_of = np.repeat(qrels.query_rows.astype(np.int64), np.diff(qrels.offsets))
        relevant = qrels.grades >= relevance_level
        parts.append(query_of[relevant] * dataset.num_documents + qrels.doc_rows[relevant])
    return np.unique(np.concatenate(parts or [np.zeros(0, np.int64)]))


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if sorted_keys.shape[0] == 0:
        return np.zeros(keys.shape, bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.shape[0] - 1)
    return sorted_keys[position] == keys


def _judged_per_query(sorted_keys: np.ndarray, query_rows: np.ndarray, num_documents: int) -> np.ndarray:
    query_rows = query_rows.astype(np.int64)
    return (np.searchsorted(sorted_keys, (query_rows + 1) * num_documents)
            - np.searchsorted(sorted_keys, query_rows * num_documents))


def select_negatives(rows: np.ndarray, scores: np.ndarray, excluded: np.ndarray, *, k: int, skip: int):
    """From rankings `[n, depth]` (best first) and a mask of excluded entries: the (skip+1)-th to (skip+k)-th
    non-excluded entries of each row, as int32 `[n, k]` rows and float32 `[n, k]` scores (padded -1 / 0)."""
    kept = ~excluded
    position = np.cumsum(kept, axis=1) - 1  # rank among the kept entries of the row
    take = kept & (position >= skip) & (position < skip + k)
    query, column = np.nonzero(take)
    out_rows = np.full((rows.shape[0], k), PAD_ROW, np.int32)
    out_scores = np.full((rows.shape[0], k), PAD_SCORE, np.float32)
    out_rows[query, position[query, column] - skip] = rows[query, column]
    out_scores[query, position[query, column] - skip] = scores[query, column]
    return out_rows, out_scores


def mine_negatives(dataset: Dataset, split: str, *, k: int, skip: int, workdir: str | Path | None = None,
                   exclude_judged: bool = True, relevance_level: int = 1, query_chunk: int = 1024,
                   corpus_chunk: int = 65536, progress: bool = False) -> Candidates:
    """Hard negatives for every judged query of `split` (see the module docstring), as `kind: negatives`."""
    if k < 1:
        raise InputError(f"must be >= 1, got {k}", field="--k")
    if skip < 0:
        raise InputError(f"must be >= 0, got {skip}", field="--skip")
    qrels = dataset.qrels(split)
    transform = None
    if workdir is not None:
        run = TrainedRun.load(workdir)
        run.check_fits(dataset)
        transform = run.transform
    elif dataset.query_dim != dataset.corpus_dim:
        raise InputError(f"query dim {dataset.query_dim} != corpus dim {dataset.corpus_dim}: pass the --workdir "
                         "of a run whose head maps queries into the corpus space", file=dataset.location)

    num_documents = dataset.num_documents
    positives = judged_keys(dataset, relevance_level)
    # Each query needs `skip + k` documents left after its own exclusions. Queries go through in order of that
    # need, each chunk at a power-of-two depth, so a few heavily judged queries do not deepen every search
    # (and the number of compiled depths stays logarithmic).
    judged_counts = _judged_per_query(positives, qrels.query_rows, num_documents)
    needed = skip + k + (judged_counts if exclude_judged else np.zeros_like(judged_counts))
    order = np.argsort(needed, kind="stable")
    queries = dataset.read_queries(qrels.query_rows)
    index = ExactIndex(dataset.read_corpus(), corpus_chunk)

    num_queries = qrels.num_queries
    doc_rows = np.empty((num_queries, k), np.int32)
    scores = np.empty((num_queries, k), np.float32)
    raw_window = min(skip + k, num_documents)
    raw_positives, deepest = 0, 0
    bar = tqdm(total=num_queries, desc=f"mine {split}", unit="query", disable=not progress, leave=False)
    for start in range(0, num_queries, query_chunk):
        chunk = order[start:start + query_chunk]
        valid = chunk.shape[0]
        depth = min(num_documents, 1 << (int(needed[chunk].max()) - 1).bit_length())
        deepest = max(deepest, depth)
        vectors = queries[chunk]
        if valid < query_chunk and num_queries > query_chunk:  # one query shape for every call
            vectors = np.pad(vectors, ((0, query_chunk - valid), (0, 0)))
        if transform is not None:
            vectors = np.asarray(transform(vectors))
        rows, row_scores = index.search(vectors, depth, query_chunk)
        rows, row_scores = rows[:valid], row_scores[:valid]
        query_rows = qrels.query_rows[chunk].astype(np.int64)
        judged = _contains(positives, query_rows[:, None] * num_documents + rows)
        raw_positives += int(judged[:, :raw_window].sum())
        excluded = judged if exclude_judged else np.zeros_like(judged)
        doc_rows[chunk], scores[chunk] = select_negatives(rows, row_scores, excluded, k=k, skip=skip)
        bar.update(valid)
    bar.close()
    info = {
        "kind": "negatives", "split": split, "skip": skip, "exclude_judged": exclude_judged,
        "relevance_level": relevance_level, "depth": deepest,
        "workdir": None if workdir is None else str(Path(workdir).absolute()),
        "short_lists": int((doc_rows[:, -1] == PAD_ROW).sum()),
        # Share of the first skip+k retrieved documents that are judged positives: what exclusion removes.
        "judged_fraction_of_top": raw_positives / max(1, num_queries * raw_window),
    }
    return Candidates(qrels.query_rows, doc_rows, scores, info)
