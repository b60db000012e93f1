"""Subsets of a split that show what a single average hides: documents never relevant in training.

A head can learn a *document prior* — lift the documents that were positives in training — and so push down
every document added after training. These views score only such documents.
"""

from __future__ import annotations

import numpy as np

from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.evaluation.evaluator import Ranking


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
