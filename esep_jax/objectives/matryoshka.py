"""Matryoshka prefixes (`loss.matryoshka_dims`): the task loss averaged over truncated indexes of the corpus.

A truncated index stores each document's first k dimensions re-normalised (cosine on the prefix, the usual way
to truncate). The task loss sees the corpus as `prefix_corpus` — every prefix's truncated rows side by side,
then the full rows — and each query as `prefix_queries`, one row per prefix placed in that prefix's block, so
one pass over the corpus scores every prefix: the prefixes are folded into the member axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.objectives.registry import Term, TermInputs


def truncated_index_rows(corpus: np.ndarray, k: int) -> np.ndarray:
    """The rows of an index truncated to k dimensions (first k dims re-normalised); k >= d changes nothing."""
    if k >= corpus.shape[-1]:
        return corpus
    prefix = corpus[..., :k]
    norms = np.linalg.norm(prefix, axis=-1, keepdims=True)
    return prefix / np.where(norms > 0, norms, 1.0)


def prefix_sizes(dims, full_dim: int) -> list[int]:
    """The prefix sizes below `full_dim`, ascending, then `full_dim`."""
    return [d for d in sorted(set(dims)) if d < full_dim] + [full_dim]


def prefix_corpus(corpus: np.ndarray, dims) -> np.ndarray:
    """`[N, Σk + d]`: the truncated index rows of every prefix k side by side, then the full rows (host)."""
    return np.concatenate([truncated_index_rows(corpus, k) for k in prefix_sizes(dims, corpus.shape[-1])], axis=-1)


def prefix_queries(vectors: jax.Array, dims) -> jax.Array:
    """`[P, ..., Σk + d]`: per prefix size (the full dimension last), the vectors' first k dimensions placed in
    that prefix's block of `prefix_corpus`, zeros elsewhere."""
    sizes = prefix_sizes(dims, vectors.shape[-1])
    widths = [*sizes[:-1], vectors.shape[-1]]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    total = sum(widths)
    rows = []
    for k, offset in zip(sizes, offsets):
        pad = [(0, 0)] * (vectors.ndim - 1) + [(offset, total - offset - k)]
        rows.append(jnp.pad(vectors[..., :k], pad))
    return jnp.stack(rows)


class MatryoshkaTask(Term):
    """A task term scored on every prefix: prefixes become extra members of one pass; the mean is returned."""

    def __init__(self, task: Term, dims):
        self.task, self.dims = task, tuple(dims)
        self.name, self.order, self.signals, self.tables = task.name, task.order, task.signals, task.tables

    def weights(self, member_values):
        return self.task.weights(member_values)

    def __call__(self, inputs: TermInputs) -> jax.Array:
        members = inputs.vectors.shape[0]
        stacked = prefix_queries(inputs.vectors, self.dims)  # [P, E, B, D]
        folded = stacked.reshape(-1, *stacked.shape[2:])
        temperatures = jnp.tile(inputs.temperatures, stacked.shape[0])
        sums = self.task(dataclasses.replace(inputs, vectors=folded, temperatures=temperatures))
        return sums.reshape(stacked.shape[0], members).mean(axis=0)


def wrap(task: Term, dims) -> Term:
    """`task` itself, or scored on every prefix when `dims` is non-empty."""
    return MatryoshkaTask(task, dims) if dims else task
