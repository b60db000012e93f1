"""Subsets of a split that show what a single average hides: documents never relevant in training.

A head can learn a *document prior* — lift the documents that were positives in training — and so push down
every document added after training. These views score only such documents.
"""

from __future__ import annotations

import numpy as np

from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.evaluation.evaluator import Ranking
from esep_jax.evaluation.metrics import mean_metrics, per_query_metrics


def documents_relevant_in(dataset: Dataset, split: str, relevance_level: int = 1) -> np.ndarray | None:
    """[N] bool: documents relevant to some query of `split` (None if the dataset has no such split)."""
    if split not in dataset.manifest["splits"]:
        return None
    qrels = dataset.qrels(split)
    seen = np.zeros(dataset.num_documents, bool)
    seen[qrels.doc_rows[qrels.grades >= relevance_level]] = True
    return seen


def unseen_relevant_view(ranking: Ranking, qrels: Qrels, seen: np.ndarray, relevance_level: int):
    """The run and qrels restricted to relevant documents never relevant in training.

    Per query, only its unseen relevant documents count as relevant; its seen relevant documents are taken out
    of the ranking (they are neither right nor wrong here), while every other document stays — so a head that
    learnt to rank training positives above everything else is caught. Returns (doc_rows, scores, qrels,
    query mask) over the queries that have at least one unseen relevant document.
    """
    keep, parts, scores = [], [], ranking.scores.copy()
    for i in range(qrels.num_queries):
        docs, grades = qrels.judgements(i)
        relevant = grades >= relevance_level
        hidden = docs[relevant & seen[docs]]
        unseen = relevant & ~seen[docs]
        if unseen.any():
            keep.append(i)
            parts.append((docs[~(relevant & seen[docs])], grades[~(relevant & seen[docs])]))
            scores[i, np.isin(ranking.doc_rows[i], hidden)] = -np.inf
    keep = np.array(keep, dtype=np.int64)
    view = Qrels.from_lists(qrels.query_rows[keep], parts)
    return ranking.doc_rows[keep], scores[keep], view, keep


def unseen_per_query(ranking: Ranking, qrels: Qrels, seen: np.ndarray, relevance_level: int, doc_id_rank: np.ndarray,
                     cutoffs) -> dict[str, np.ndarray] | None:
    """Per-query metrics of `unseen_relevant_view` (None when no query has an unseen relevant document)."""
    rows, scores, view, keep = unseen_relevant_view(ranking, qrels, seen, relevance_level)
    if not len(keep):
        return None
    return per_query_metrics(rows, scores, view, doc_id_rank, cutoffs, relevance_level)


def unseen_metrics(ranking: Ranking, qrels: Qrels, seen: np.ndarray, relevance_level: int, doc_id_rank: np.ndarray,
                   cutoffs) -> tuple[int, dict | None]:
    """(queries, mean metrics) of `unseen_relevant_view`; (0, None) when no query has an unseen relevant doc."""
    per_query = unseen_per_query(ranking, qrels, seen, relevance_level, doc_id_rank, cutoffs)
    if per_query is None:
        return 0, None
    return len(next(iter(per_query.values()))), mean_metrics(per_query)


def harm_test(base: np.ndarray, head: np.ndarray, tolerance: float) -> dict:
    """Whether a head is worse than the base on a view, from per-query scores of the same queries.

    Harmful means: the mean loss exceeds `tolerance` *and* a one-sided paired t-test says the loss is not noise
    (t < −1.645, p < 0.05) — on a view of a few dozen queries a single unlucky query must not condemn a head.
    """
    delta = np.asarray(head, np.float64) - np.asarray(base, np.float64)
    spread = delta.std(ddof=1) if delta.size > 1 else 0.0
    t = float(delta.mean() / (spread / np.sqrt(delta.size))) if spread > 0 else (0.0 if delta.mean() == 0 else
                                                                                  float(np.sign(delta.mean()) * np.inf))
    return {"queries": int(delta.size), "mean_delta": float(delta.mean()), "t": t,
            "harmful": bool(delta.mean() < -tolerance and t < -1.645)}


def hold_out_documents(train: Qrels, dev: Qrels, fraction: float, seed: int, relevance_level: int = 1
                       ) -> tuple[Qrels, np.ndarray]:
    """(training qrels without any judgement of the held-out documents, held-out corpus rows).

    The held-out documents are a seeded random `fraction` of those relevant both to a dev query and to a
    training query (documents relevant to dev queries only are unseen already): documents "added after
    training" as a random sample, so the new-documents dev view has many queries. (Holding out the documents
    with the fewest training judgements instead costs fewer judgements, but it is a view of rare documents,
    not new ones: on NFCorpus it scored 2 points lower for base and head alike.)
    """
    in_train = np.unique(train.doc_rows[train.grades >= relevance_level])
    in_dev = np.unique(dev.doc_rows[dev.grades >= relevance_level])
    candidates = np.intersect1d(in_train, in_dev)
    count = int(round(fraction * candidates.size))
    if count == 0:
        return train, np.zeros(0, np.int64)
    held_out = np.sort(np.random.default_rng([seed, 13]).choice(candidates, count, replace=False))
    keep = ~np.isin(train.doc_rows, held_out)
    query_of = np.repeat(np.arange(train.num_queries), np.diff(train.offsets))
    positives = np.bincount(query_of[keep & (train.grades >= relevance_level)], minlength=train.num_queries)
    keep &= positives[query_of] > 0  # a query left without a positive leaves training
    counts = np.bincount(query_of[keep], minlength=train.num_queries)
    kept_queries = counts > 0
    reduced = Qrels(query_rows=train.query_rows[kept_queries],
                    offsets=np.concatenate([[0], np.cumsum(counts[kept_queries])]).astype(np.int64),
                    doc_rows=train.doc_rows[keep], grades=train.grades[keep])
    return reduced, held_out
