"""Reciprocal-rank fusion (RRF) of ranked lists, TREC run files, and the metrics of a fused run.

RRF (Cormack, Clarke & Büttcher, 2009): a document's fused score is `Σ_s w_s / (k + rank_s(d))` over the systems
whose top-`depth` list holds it (ranks from 1; k = 60 by default). It needs no score calibration between
systems, which is why it is the usual way to combine a lexical and a dense retriever. The serving path
(`esep_jax.serving.hybrid`) fuses with the same formula and defaults (it cannot import this stage).

`esep-jax eval --fuse RUN.trec` fuses any run file (`qid Q0 docid rank score tag`, ranked as trec_eval ranks it:
score descending, ties by docid descending; the rank column is not used) with the evaluated system's run and
scores the fused run like every other (`esep_jax.evaluation.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from esep_jax.errors import InputError
from esep_jax.evaluation.metrics import mean_metrics, per_query_metrics, trec_order

DEFAULT_K = 60.0
DEFAULT_DEPTH = 100


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], weights: Sequence[float] | None = None,
                           k: float = DEFAULT_K, depth: int | None = None) -> list[tuple[str, float]]:
    """`[(doc, fused score)]`, best first, of ranked doc lists (best first; the first `depth` of each count).

    Ties go to the document ranked higher by the first list, then the next, then the smaller doc id. A document
    repeated within one list counts at its best rank only.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    check_settings(k, weights, depth)
    fused: dict[str, float] = {}
    ranks: dict[str, list[float]] = {}
    for s, (ranking, weight) in enumerate(zip(rankings, weights)):
        for rank, doc in enumerate(ranking[:depth] if depth is not None else ranking, start=1):
            if doc in ranks and ranks[doc][s] != math.inf:
                continue
            fused[doc] = fused.get(doc, 0.0) + weight / (k + rank)
            ranks.setdefault(doc, [math.inf] * len(rankings))[s] = rank
    return [(doc, fused[doc]) for doc in sorted(fused, key=lambda d: (-fused[d], *ranks[d], d))]


def check_settings(k: float, weights: Sequence[float], depth: int | None) -> None:
    """An InputError naming the option for an RRF k < 0, a negative or non-finite weight, or a depth < 1."""
    if not math.isfinite(k) or k < 0:
        raise InputError(f"must be a finite number >= 0, got {k}", field="--fuse-k")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise InputError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}", field="--fuse-weight")
    if depth is not None and depth < 1:
        raise InputError(f"must be >= 1, got {depth}", field="--fuse-depth")


def read_trec_run(path: str, known_docs=None) -> dict[str, list[tuple[str, float]]]:
    """`{qid: [(docid, score)]}` of a TREC run file, each query's list ranked as trec_eval ranks it.

    One InputError naming the file and line for a line without 6 fields, a score that is not a finite number,
    a (qid, docid) pair given twice, or (with `known_docs`, a container of ids) a document not in it.
    """
    runs: dict[str, dict[str, float]] = {}
    try:
        with open(path, "rb") as handle:
            for n, raw in enumerate(handle, start=1):
                try:
                    fields = raw.decode("utf-8").split()
                except UnicodeDecodeError as error:
                    raise InputError(f"not UTF-8 ({error.reason} at byte {error.start})", file=path, line=n) from None
                if not fields:
                    continue
                if len(fields) != 6:
                    raise InputError(f"expected 6 fields `qid Q0 docid rank score tag`, got {len(fields)}",
                                     file=path, line=n)
                qid, _, doc, _, score_text, _ = fields
                try:
                    score = float(score_text)
                except ValueError:
                    score = math.nan
                if not math.isfinite(score):
                    raise InputError(f"score {score_text!r} is not a finite number", file=path, line=n)
                if known_docs is not None and doc not in known_docs:
                    raise InputError(f"document {doc!r} is not in the dataset's corpus", file=path, line=n)
                if doc in runs.setdefault(qid, {}):
                    raise InputError(f"document {doc!r} is ranked twice for query {qid!r}", file=path, line=n)
                runs[qid][doc] = score
    except OSError as error:
        raise InputError(f"cannot read: {error.strerror or error}", file=path) from None
    if not runs:
        raise InputError("no ranked documents", file=path)
    # trec_eval's order: score descending, then docid descending (byte order).
    return {qid: sorted(docs.items(), key=lambda item: (-item[1], _descending(item[0])))
            for qid, docs in runs.items()}


def _descending(text: str) -> tuple:
    return tuple(-b for b in text.encode("utf-8")) + (1,)  # the trailing 1: a prefix sorts after its extensions


def _as_arrays(lists: list[list[tuple[str, float]]], row_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ranked (doc, score) lists as `[Q, D]` corpus rows (-1 past a list's end) and scores (-inf there)."""
    width = max([len(items) for items in lists] + [1])
    rows = np.full((len(lists), width), -1, np.int64)
    scores = np.full((len(lists), width), -np.inf, np.float64)
    for i, items in enumerate(lists):
        for j, (doc, score) in enumerate(items):
            rows[i, j], scores[i, j] = row_of[doc], score
    return rows, scores


def fuse_with_run(evaluator, ranking, run_path: str, weight: float = 1.0, k: float = DEFAULT_K,
                  depth: int = DEFAULT_DEPTH) -> dict:
    """Metrics of `run_path` alone and fused by RRF with `ranking` (the evaluated system's run on the judged
    queries of `evaluator`, weight 1; the file's run weighs `weight`), each list cut to its first `depth`."""
    check_settings(k, [1.0, weight], depth)
    dataset, qrels = evaluator.dataset, evaluator.qrels
    query_ids, doc_ids = dataset.ids("queries"), dataset.ids("corpus")
    row_of = {doc: row for row, doc in enumerate(doc_ids)}
    other = read_trec_run(run_path, known_docs=row_of)
    order = trec_order(ranking.scores, ranking.doc_rows, evaluator.doc_id_rank)
    own_lists, other_lists, fused_lists = [], [], []
    for i, query_row in enumerate(qrels.query_rows.tolist()):
        own = [doc_ids[ranking.doc_rows[i, j]] for j in order[i]]
        theirs = other.get(query_ids[query_row], [])
        own_lists.append(own)
        other_lists.append(theirs)
        fused_lists.append(reciprocal_rank_fusion([own, [doc for doc, _ in theirs]], [1.0, weight], k, depth))
    judged = {query_ids[row] for row in qrels.query_rows.tolist()}

    def metrics(lists):
        rows, scores = _as_arrays(lists, row_of)
        return mean_metrics(per_query_metrics(rows, scores, qrels, evaluator.doc_id_rank, evaluator.cutoffs,
                                              evaluator.relevance_level))

    return {"run": str(run_path), "weight": weight, "k": k, "depth": depth,
            "queries_in_run": len(judged & set(other)), "run_alone": metrics(other_lists),
            "fused": metrics(fused_lists)}
