"""Multi-positive targets: each query's positives `[B, P]` (`-1` = padding) with non-negative weights (grades)
are normalised into a target distribution, so a query with forty relevant documents gets one unit of loss
spread over all of them instead of forty competing (query, doc) pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_distribution(positive_ids: jax.Array, positive_weights: jax.Array) -> jax.Array:
    """Per-query normalised weights `[B, P]` (zero on padding); all-zero rows stay zero."""
    weights = jnp.where(positive_ids >= 0, positive_weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)
