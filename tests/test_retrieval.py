"""Chunked exact top-k equals a full sort, for every way of cutting the corpus and the queries."""

from __future__ import annotations

import numpy as np
import pytest

from esep_jax.evaluation.retrieval import ExactIndex


@pytest.mark.parametrize("num_docs, corpus_chunk, query_chunk, k", [
    (100, 100, 64, 10), (101, 16, 7, 10), (50, 8, 1000, 50), (30, 64, 5, 100)])
def test_matches_full_sort(num_docs, corpus_chunk, query_chunk, k):
    rng = np.random.default_rng(num_docs)
    corpus = rng.normal(size=(num_docs, 12)).astype(np.float32)
    queries = rng.normal(size=(23, 12)).astype(np.float32)
    rows, scores = ExactIndex(corpus, corpus_chunk).search(queries, k, query_chunk)
    full = queries @ corpus.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :min(k, num_docs)]
    assert rows.shape == (23, min(k, num_docs))
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert (rows >= 0).all() and (rows < num_docs).all()  # padding never leaks out as a result
