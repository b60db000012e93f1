"""Heads start as the identity (so an untrained head is the base retrieval) and map to the corpus dim."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from esep_jax.config import ModelConfig
from esep_jax.heads import build_head, head_names, init_params


@pytest.mark.parametrize("kind", head_names())
@pytest.mark.parametrize("query_dim, corpus_dim", [(16, 16), (12, 16), (16, 10)])
def test_untrained_head_is_identity(kind, query_dim, corpus_dim):
    head = build_head(ModelConfig(head=kind, rank=4, hidden_dim=8, dropout=0.5), corpus_dim)
    params = init_params(head, jax.random.key(0), query_dim)
    queries = np.random.default_rng(0).normal(size=(5, query_dim)).astype(np.float32)
    out = np.asarray(head.apply({"params": params}, queries))
    expected = np.zeros((5, corpus_dim), np.float32)
    width = min(query_dim, corpus_dim)
    expected[:, :width] = queries[:, :width]
    np.testing.assert_array_equal(out, expected)  # exactly, not approximately


def test_heads_can_express_non_identity_maps():
    head = build_head(ModelConfig(head="lowrank", rank=3), 8)
    params = init_params(head, jax.random.key(0), 8)
    params = jax.tree.map(lambda p: p + 0.1, params)
    queries = np.eye(8, dtype=np.float32)
    assert not np.allclose(head.apply({"params": params}, queries), queries)
