"""Training losses for searching modules (all return per-query values; the caller averages).

Positives arrive as padded `[B, P]` corpus rows (`-1` = padding) with non-negative weights (grades); each
query's weights are normalised into a target distribution, so a query with forty relevant documents gets
one unit of loss spread over all of them instead of forty competing (query, doc) pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_distribution(positive_ids: jax.Array, positive_weights: jax.Array) -> jax.Array:
    """Per-query normalised weights `[B, P]` (zero on padding); all-zero rows stay zero."""
    weights = jnp.where(positive_ids >= 0, positive_weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def full_corpus_softmax_loss(query_vectors: jax.Array, corpus: jax.Array, positive_ids: jax.Array,
                             positive_weights: jax.Array, temperature: float,
                             document_mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of the softmax over the *whole* corpus against the multi-positive target.

    `loss_i = logsumexp_j(<f(q_i), c_j>/τ) − Σ_p w_ip <f(q_i), c_p>/τ`. With `document_mask` [N], only the
    masked-in documents enter the softmax (positives must be among them). This plain version builds the
    `[B, N]` logits; it is the reference for the blockwise implementation.
    """
    logits = jnp.einsum("bd,nd->bn", query_vectors, corpus.astype(query_vectors.dtype)) / temperature
    if document_mask is not None:
        logits = jnp.where(document_mask[None, :], logits, -jnp.inf)
    positive_logits = jnp.take_along_axis(logits, jnp.maximum(positive_ids, 0), axis=-1)
    targets = target_distribution(positive_ids, positive_weights)
    # `where`, not a product: padding may point at a masked-out (-inf) document.
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(targets > 0, targets * positive_logits, 0.0).sum(axis=-1)


def in_batch_softmax_loss(query_vectors: jax.Array, doc_vectors: jax.Array, doc_ids: jax.Array,
                          positive_ids: jax.Array, positive_weights: jax.Array, temperature: float) -> jax.Array:
    """Softmax over the batch's documents (one sampled positive per query).

    Column `j` counts as a positive of query `i` whenever `doc_ids[j]` is among `i`'s positives — not only on
    the diagonal — so a document shared by two queries in a batch is never treated as a negative.
    """
    logits = jnp.einsum("bd,kd->bk", query_vectors, doc_vectors.astype(query_vectors.dtype)) / temperature
    matches = (positive_ids[:, :, None] == doc_ids[None, None, :]) & (positive_ids[:, :, None] >= 0)
    column_weights = (matches * positive_weights[:, :, None]).max(axis=1)  # [B, K]
    total = column_weights.sum(axis=-1, keepdims=True)
    targets = column_weights / jnp.where(total > 0, total, 1.0)
    return jax.nn.logsumexp(logits, axis=-1) - (targets * logits).sum(axis=-1)


def sample_positive(key: jax.Array, positive_ids: jax.Array, positive_weights: jax.Array) -> jax.Array:
    """One positive per query, drawn in proportion to its weight: `[B]` corpus rows."""
    weights = jnp.where(positive_ids >= 0, positive_weights, 0.0)
    logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    choice = jax.random.categorical(key, logits, axis=-1)
    return jnp.take_along_axis(positive_ids, choice[:, None], axis=-1)[:, 0]


def recovery_penalty(query_vectors: jax.Array, base_vectors: jax.Array) -> jax.Array:
    """`‖f(q) − E q‖²` per query: how far the head moved each query from the base retrieval."""
    return jnp.sum(jnp.square(query_vectors - base_vectors), axis=-1)
