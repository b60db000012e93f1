"""Losses against direct numpy computations, including multi-positive targets and shared in-batch docs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esep_jax.objectives.full_corpus import full_corpus_softmax_loss
from esep_jax.objectives.in_batch import in_batch_softmax_loss, sample_positive
from esep_jax.objectives.recovery import recovery_penalty
from esep_jax.objectives.targets import target_distribution


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def test_full_corpus_loss_is_cross_entropy_against_grade_weighted_targets():
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(3, 5)), rng.normal(size=(9, 5))
    ids = np.array([[2, 4, -1], [7, -1, -1], [0, 1, 8]])
    weights = np.array([[2.0, 1.0, 5.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # weight on padding is ignored
    loss = full_corpus_softmax_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(corpus, jnp.float32),
                                    jnp.asarray(ids), jnp.asarray(weights, jnp.float32), 0.1)
    logits = queries @ corpus.T / 0.1
    log_p = logits - _logsumexp(logits)[:, None]
    expected = [-(2 / 3 * log_p[0, 2] + 1 / 3 * log_p[0, 4]), -log_p[1, 7], -log_p[2, [0, 1, 8]].mean()]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_target_distribution_handles_rows_without_positives():
    targets = target_distribution(jnp.array([[-1, -1], [3, 4]]), jnp.array([[1.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(targets, [[0, 0], [0.25, 0.75]])


def test_in_batch_loss_treats_shared_documents_as_positives():
    rng = np.random.default_rng(1)
    queries, docs = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    doc_ids = np.array([10, 11, 10])  # queries 0 and 2 sampled the same document
    positives = np.array([[10, 12], [11, -1], [10, 13]])
    weights = np.ones((3, 2))
    loss = in_batch_softmax_loss(*(jnp.asarray(a, jnp.float32) for a in (queries, docs)), jnp.asarray(doc_ids),
                                 jnp.asarray(positives), jnp.asarray(weights, jnp.float32), 0.5)
    logits = queries @ docs.T / 0.5
    log_p = logits - _logsumexp(logits)[:, None]
    expected = [-(log_p[0, 0] + log_p[0, 2]) / 2, -log_p[1, 1], -(log_p[2, 0] + log_p[2, 2]) / 2]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sample_positive_draws_only_real_positives_by_weight():
    ids = jnp.array([[5, 6, -1]] * 4000)
    weights = jnp.array([[1.0, 3.0, 9.0]] * 4000)
    draws = np.asarray(sample_positive(jax.random.key(0), ids, weights))
    assert set(np.unique(draws)) == {5, 6}
    assert (draws == 6).mean() == pytest.approx(0.75, abs=0.03)


def test_recovery_penalty():
    np.testing.assert_allclose(recovery_penalty(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])), [5.0])


def test_document_mask_limits_the_softmax_to_masked_in_documents():
    rng = np.random.default_rng(2)
    queries, corpus = rng.normal(size=(2, 4)), rng.normal(size=(6, 4))
    ids, weights = np.array([[1, -1], [4, 5]]), np.ones((2, 2))
    mask = np.array([True, True, False, False, True, True])
    loss = full_corpus_softmax_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(corpus, jnp.float32),
                                    jnp.asarray(ids), jnp.asarray(weights, jnp.float32), 0.2, jnp.asarray(mask))
    logits = (queries @ corpus.T / 0.2)[:, mask]  # columns 0, 1, 4, 5
    log_p = logits - _logsumexp(logits)[:, None]
    np.testing.assert_allclose(loss, [-log_p[0, 1], -(log_p[1, 2] + log_p[1, 3]) / 2], rtol=1e-5)
