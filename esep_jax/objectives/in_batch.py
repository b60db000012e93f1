"""`loss.kind=in_batch`: a softmax over the batch's sampled positives (one per query), where a document shared
by two queries of the batch is never one's negative."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esep_jax.objectives import matryoshka
from esep_jax.objectives.corpus_softmax import widen
from esep_jax.objectives.registry import CORPUS, Term, TermInputs, register_term


def in_batch_softmax_loss(query_vectors: jax.Array, doc_vectors: jax.Array, doc_ids: jax.Array,
                          positive_ids: jax.Array, positive_weights: jax.Array, temperature: float) -> jax.Array:
    """Softmax over the batch's documents; column `j` is a positive of query `i` whenever `doc_ids[j]` is among
    `i`'s positives — not only on the diagonal."""
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


class InBatchSoftmax(Term):
    name = "task_loss"
    order = 0
    tables = frozenset({CORPUS})

    def __init__(self, task_weight: float):
        self.task_weight = task_weight

    def weights(self, member_values):
        return super().weights(member_values) * self.task_weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        positive_ids, positive_weights = inputs.batch["positive_ids"], inputs.batch["positive_weights"]
        sampled = sample_positive(jax.random.fold_in(inputs.key, 1), positive_ids, positive_weights)
        documents = widen(inputs.tables[CORPUS][0][sampled])
        return jax.vmap(lambda v: in_batch_softmax_loss(v, documents, sampled, positive_ids, positive_weights,
                                                        1.0))(inputs.scaled).sum(axis=1)


@register_term("in_batch")
def _factory(config, dataset):
    if config.loss.kind != "in_batch" or config.loss.task_weight <= 0:
        return None
    return matryoshka.wrap(InBatchSoftmax(config.loss.task_weight), config.loss.matryoshka_dims)
