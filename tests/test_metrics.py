"""Metrics equal trec_eval's (through pytrec_eval) to 1e-6, ties and graded judgements included."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from esep_jax.data.dataset import Qrels
from esep_jax.evaluation.metrics import DEFAULT_CUTOFFS, doc_id_ranks, mean_metrics, per_query_metrics

TREC_NAMES = {"ndcg": "ndcg_cut_{k}", "recall": "recall_{k}", "map": "map_cut_{k}", "p": "P_{k}"}


def _random_case(seed: int, num_queries=30, num_docs=300, depth=120, tie_levels=None):
    rng = np.random.default_rng(seed)
    doc_ids = [f"D{rng.integers(10**6)}-{i}" for i in range(num_docs)]  # ids not in row order
    rows = np.stack([rng.choice(num_docs, depth, replace=False) for _ in range(num_queries)]).astype(np.int32)
    scores = rng.normal(size=rows.shape).astype(np.float32)
    if tie_levels:  # many exact ties, which trec_eval breaks by doc id
        scores = np.round(scores * tie_levels) / tie_levels
    per_query, offsets = [], [0]
    for q in range(num_queries):
        judged = rng.choice(num_docs, rng.integers(1, 25), replace=False)
        grades = rng.integers(-1, 4, size=len(judged))
        if q == 0:
            grades[:] = 0  # a query with no relevant document
        per_query.append((judged, grades))
        offsets.append(offsets[-1] + len(judged))
    qrels = Qrels(np.arange(num_queries, dtype=np.int32), np.array(offsets, np.int64),
                  np.concatenate([j for j, _ in per_query]).astype(np.int32),
                  np.concatenate([g for _, g in per_query]).astype(np.int32))
    return doc_ids, rows, scores, qrels


def _pytrec(doc_ids, rows, scores, qrels, cutoffs, relevance_level=1):
    trec_qrels = {f"q{q}": {doc_ids[d]: int(g) for d, g in zip(*qrels.judgements(q))}
                  for q in range(qrels.num_queries)}
    measures = {TREC_NAMES[m].format(k=k) for m in TREC_NAMES for k in cutoffs} | {"recip_rank"}
    run = {f"q{q}": {doc_ids[d]: float(s) for d, s in zip(rows[q], scores[q])} for q in range(len(rows))}
    evaluator = pytrec_eval.RelevanceEvaluator(trec_qrels, measures, relevance_level=relevance_level)
    results = evaluator.evaluate(run)
    # trec_eval's recip_rank has no cutoff: MRR@k is recip_rank over the run cut to its top k.
    for k in cutoffs:
        cut = {}
        for q in range(len(rows)):
            ranked = sorted(run[f"q{q}"].items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
            cut[f"q{q}"] = dict(ranked)
        for qid, values in pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"},
                                                          relevance_level=relevance_level).evaluate(cut).items():
            results[qid][f"mrr@{k}"] = values["recip_rank"]
    return results


@pytest.mark.parametrize("seed, tie_levels, relevance_level", [(0, None, 1), (1, 4, 1), (2, 2, 2), (3, 8, 1)])
def test_equals_trec_eval(seed, tie_levels, relevance_level):
    doc_ids, rows, scores, qrels = _random_case(seed, tie_levels=tie_levels)
    cutoffs = (1, 3, 5, 10, 100, 1000)
    ours = per_query_metrics(rows, scores, qrels, doc_id_ranks(doc_ids), cutoffs, relevance_level)
    reference = _pytrec(doc_ids, rows, scores, qrels, cutoffs, relevance_level)
    for q in range(qrels.num_queries):
        for k in cutoffs:
            for measure, trec_name in TREC_NAMES.items():
                assert ours[f"{measure}@{k}"][q] == pytest.approx(reference[f"q{q}"][trec_name.format(k=k)],
                                                                  abs=1e-6), (q, measure, k)
            assert ours[f"mrr@{k}"][q] == pytest.approx(reference[f"q{q}"][f"mrr@{k}"], abs=1e-6)
    means = mean_metrics(ours)
    assert means["ndcg@10"] == pytest.approx(np.mean([reference[f"q{q}"]["ndcg_cut_10"]
                                                      for q in range(qrels.num_queries)]), abs=1e-6)


def test_perfect_and_empty_rankings():
    qrels = Qrels(np.array([0, 1], np.int32), np.array([0, 2, 3], np.int64), np.array([5, 6, 7], np.int32),
                  np.array([2, 1, 1], np.int32))
    doc_ids = [f"d{i}" for i in range(10)]
    rows = np.array([[5, 6, 0, 1], [0, 1, 2, 3]], np.int32)
    scores = np.array([[4, 3, 2, 1], [4, 3, 2, 1]], np.float32)
    values = per_query_metrics(rows, scores, qrels, doc_id_ranks(doc_ids), cutoffs=DEFAULT_CUTOFFS)
    assert values["ndcg@10"].tolist() == [1.0, 0.0]
    assert values["mrr@10"].tolist() == [1.0, 0.0]
    assert values["recall@3"].tolist() == [1.0, 0.0]
