"""The eval report's unseen-relevant view: only never-seen relevant documents count, the rest stay ranked."""

from __future__ import annotations

import numpy as np

from esep_jax.data.dataset import Qrels
from esep_jax.evaluation.evaluator import Ranking
from esep_jax.evaluation.views import unseen_relevant_view


def test_unseen_relevant_view_hides_seen_positives_and_keeps_other_documents():
    # Query 0: relevant 1 (seen) and 2 (unseen); query 1: relevant 3 (seen) only; query 2: relevant 4 (unseen).
    qrels = Qrels(np.array([0, 1, 2], np.int32), np.array([0, 3, 4, 5], np.int64),
                  np.array([1, 2, 5, 3, 4], np.int32), np.array([1, 2, 0, 1, 1], np.int32))
    seen = np.zeros(8, bool)
    seen[[1, 3, 6]] = True
    rows = np.array([[1, 6, 2, 0], [3, 0, 1, 2], [6, 4, 0, 1]], np.int32)
    scores = np.array([[4, 3, 2, 1]] * 3, np.float32)
    ranking = Ranking(rows, scores, {}, {})
    view_rows, view_scores, view, keep = unseen_relevant_view(ranking, qrels, seen, relevance_level=1)
    assert keep.tolist() == [0, 2]  # query 1 has no unseen relevant document
    assert view_scores[0].tolist() == [-np.inf, 3, 2, 1]  # its seen positive is out of the ranking ...
    assert view_scores[1].tolist() == [4, 3, 2, 1]  # ... but seen non-positives (6) stay and can outrank
    docs, grades = view.judgements(0)
    assert sorted(zip(docs.tolist(), grades.tolist())) == [(2, 2), (5, 0)]
