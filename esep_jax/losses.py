"""Training losses for searching modules (all return per-query values; the caller averages).

Positives arrive as padded `[B, P]` corpus rows (`-1` = padding) with non-negative weights (grades); each
query's weights are normalised into a target distribution, so a query with forty relevant documents gets
one unit of loss spread over all of them instead of forty competing (query, doc) pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def candidate_softmax_loss(query_vectors: jax.Array, candidate_vectors: jax.Array, bias: jax.Array,
                           mask: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of a softmax over each query's own candidates `[B, C, d]` (sampled softmax).

    `bias` is added to the logits (the log-Q correction of sampled slots), `mask` drops padding and duplicate
    slots, `targets [B, C]` is the (normalised) target distribution — non-zero only on positive slots.
    `query_vectors` are already divided by the temperature.
    """
    logits = jnp.einsum("bd,bcd->bc", query_vectors, candidate_vectors.astype(query_vectors.dtype)) + bias
    logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(targets > 0, targets * logits, 0.0).sum(axis=-1)


def teacher_kl_loss(query_vectors: jax.Array, candidate_vectors: jax.Array, teacher_scores: jax.Array,
                    mask: jax.Array, teacher_temperature: float) -> jax.Array:
    """`KL(p_teacher ‖ p_head)` over each query's teacher candidates; 0 for a query without candidates.

    `p_teacher = softmax(scores / teacher_temperature)`, `p_head = softmax(<f(q), c>)` with `query_vectors`
    already divided by the head's temperature.
    """
    has_any = mask.any(axis=-1)
    safe_mask = mask | ~has_any[:, None]  # a row without candidates computes on dummies, then is zeroed
    student = jnp.einsum("bd,bcd->bc", query_vectors, candidate_vectors.astype(query_vectors.dtype))
    log_student = jax.nn.log_softmax(jnp.where(safe_mask, student, -jnp.inf), axis=-1)
    log_teacher = jax.nn.log_softmax(jnp.where(safe_mask, teacher_scores / teacher_temperature, -jnp.inf), axis=-1)
    terms = jnp.where(safe_mask, jnp.exp(log_teacher) * (log_teacher - log_student), 0.0)
    return jnp.where(has_any, terms.sum(axis=-1), 0.0)


def listwise_distillation_loss(scaled_vectors: jax.Array, teacher_logits: jax.Array,
                               student_documents: jax.Array) -> jax.Array:
    """`KL(softmax(teacher_logits) ‖ softmax(<v, d>))` per row over a shared list of documents `[M, d]`.

    `scaled_vectors [B, d]` are the head's query vectors already divided by its temperature; `teacher_logits
    [B, M]` are the teacher's temperature-scaled scores of the same M documents (held constant: no gradient
    flows into the teacher). The `[B, M]` logits are built whole; micro-batching bounds B.
    """
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
    student = jnp.einsum("bd,md->bm", scaled_vectors, student_documents.astype(scaled_vectors.dtype))
    log_student = jax.nn.log_softmax(student, axis=-1)
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


def distillation_loss(vectors: jax.Array, targets: jax.Array, kind: str) -> jax.Array:
    """Per-row distance of mapped vectors to target vectors: `mse` = ‖v − t‖², `cosine` = 1 − cos(v, t)."""
    if kind == "mse":
        return jnp.sum(jnp.square(vectors - targets), axis=-1)
    if kind == "cosine":
        dot = jnp.sum(vectors * targets, axis=-1)
        norms = jnp.linalg.norm(vectors, axis=-1) * jnp.linalg.norm(targets, axis=-1)
        return 1.0 - dot / jnp.maximum(norms, 1e-12)
    raise ValueError(f"unknown distillation kind {kind!r}")


def truncated_index_rows(corpus: np.ndarray, k: int) -> np.ndarray:
    """The rows of an index truncated to k dimensions: each document's first k dimensions re-normalised
    (cosine on the prefix, the usual way to truncate embeddings); k >= d leaves the corpus as it is."""
    if k >= corpus.shape[-1]:
        return corpus
    prefix = corpus[..., :k]
    norms = np.linalg.norm(prefix, axis=-1, keepdims=True)
    return prefix / np.where(norms > 0, norms, 1.0)


def prefix_corpus(corpus: np.ndarray, dims: list[int]) -> np.ndarray:
    """The corpus seen by a Matryoshka loss (built on the host): `[N, Σk + d]`, the truncated index rows of
    every prefix k (`truncated_index_rows`) side by side, then the full rows.

    Laying the truncated indexes side by side lets one corpus pass score every prefix:
    `<prefix_queries(q)[i], prefix_corpus(c)>` is `<q[:k_i], c[:k_i] / ‖c[:k_i]‖>`, and the last block is the
    untruncated score.
    """
    return np.concatenate([truncated_index_rows(corpus, k) for k in _prefix_sizes(dims, corpus.shape[-1])], axis=-1)


def prefix_queries(vectors: jax.Array, dims: list[int]) -> jax.Array:
    """`[P, ..., Σk + d]`: per prefix size (and the full dimension last), the query's first k dimensions placed
    in that prefix's block of `prefix_corpus`, zeros elsewhere."""
    sizes = _prefix_sizes(dims, vectors.shape[-1])
    widths = [*sizes[:-1], vectors.shape[-1]]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    total = sum(widths)
    rows = []
    for k, offset in zip(sizes, offsets):
        pad = [(0, 0)] * (vectors.ndim - 1) + [(offset, total - offset - k)]
        rows.append(jnp.pad(vectors[..., :k], pad))
    return jnp.stack(rows)


def _prefix_sizes(dims: list[int], full_dim: int) -> list[int]:
    return [d for d in sorted(set(dims)) if d < full_dim] + [full_dim]
