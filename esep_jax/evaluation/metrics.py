"""IR metrics computed exactly as trec_eval computes them.

Conventions copied from trec_eval (and so from pytrec_eval, BEIR and MTEB):
- a run is ranked by score, descending, ties broken by document id in *descending* string order;
- nDCG uses the grade itself as gain (linear gain, log2(rank + 1) discount) and an ideal ranking built from all
  judged documents with grade > 0 (`ndcg_cut_k`);
- binary measures count a document as relevant when its grade is >= `relevance_level` (default 1):
  `recall_k`, `map_cut_k`, `P_k`, and the reciprocal rank of the first relevant document within the top k;
- each measure is averaged over the judged queries of the split.
"""

from __future__ import annotations

import numpy as np

from esep_jax.config.schema import CUTOFFS as DEFAULT_CUTOFFS
from esep_jax.data.dataset import Qrels


def trec_order(scores: np.ndarray, doc_rows: np.ndarray, doc_id_rank: np.ndarray) -> np.ndarray:
    """Per-row permutation sorting `[Q, K]` results the way trec_eval does (score desc, doc id desc)."""
    return np.lexsort((-doc_id_rank[doc_rows], -scores.astype(np.float64)), axis=-1)


def doc_id_ranks(doc_ids: list[str]) -> np.ndarray:
    """Rank of every corpus row's id in ascending string (byte) order, for tie-breaking."""
    order = sorted(range(len(doc_ids)), key=lambda row: doc_ids[row].encode("utf-8"))
    ranks = np.empty(len(doc_ids), dtype=np.int64)
    ranks[order] = np.arange(len(doc_ids))
    return ranks


def per_query_metrics(doc_rows: np.ndarray, scores: np.ndarray, qrels: Qrels, doc_id_rank: np.ndarray,
                      cutoffs=DEFAULT_CUTOFFS, relevance_level: int = 1) -> dict[str, np.ndarray]:
    """Metric values per query. Row i of `doc_rows`/`scores` is the run of the i-th query of `qrels`."""
    if doc_rows.shape[0] != qrels.num_queries:
        raise ValueError(f"{doc_rows.shape[0]} ranked rows for {qrels.num_queries} judged queries")
    order = trec_order(scores, doc_rows, doc_id_rank)
    ranked = np.take_along_axis(doc_rows, order, axis=-1)
    depth = ranked.shape[1]
    grades = np.zeros(ranked.shape, dtype=np.float64)
    ideal_dcg = {k: np.zeros(qrels.num_queries) for k in cutoffs}
    num_relevant = np.zeros(qrels.num_queries)
    discounts = 1.0 / np.log2(np.arange(2, max(max(cutoffs), depth) + 2))
    for i in range(qrels.num_queries):
        judged, judged_grades = qrels.judgements(i)
        lookup = dict(zip(judged.tolist(), judged_grades.tolist()))
        grades[i] = [lookup.get(row, 0) for row in ranked[i].tolist()]
        ideal = np.sort(judged_grades[judged_grades > 0])[::-1].astype(np.float64)
        for k in cutoffs:
            ideal_dcg[k][i] = (ideal[:k] * discounts[:len(ideal[:k])]).sum()
        num_relevant[i] = (judged_grades >= relevance_level).sum()

    gains = np.where(grades > 0, grades, 0.0)
    relevant = grades >= relevance_level
    hits = np.cumsum(relevant, axis=1)
    precision_at_hit = np.where(relevant, hits / np.arange(1, depth + 1), 0.0)
    first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1), depth)
    safe_relevant = np.where(num_relevant > 0, num_relevant, 1.0)

    results: dict[str, np.ndarray] = {}
    for k in cutoffs:
        top = min(k, depth)
        dcg = (gains[:, :top] * discounts[:top]).sum(axis=1)
        results[f"ndcg@{k}"] = np.where(ideal_dcg[k] > 0, dcg / np.where(ideal_dcg[k] > 0, ideal_dcg[k], 1), 0.0)
        results[f"mrr@{k}"] = np.where(first_hit < top, 1.0 / (first_hit + 1), 0.0)
        results[f"recall@{k}"] = np.where(num_relevant > 0, hits[:, top - 1] / safe_relevant, 0.0)
        results[f"map@{k}"] = np.where(num_relevant > 0, precision_at_hit[:, :top].sum(axis=1) / safe_relevant, 0.0)
        results[f"p@{k}"] = hits[:, top - 1] / k
    return results


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of every per-query metric (trec_eval's `all` line)."""
    return {name: float(values.mean()) for name, values in per_query.items()}
