"""Deterministic, step-addressed training batches streamed from tensorstore.

Batch `s` is a pure function of (seed, s): the stream of judged training queries is cut into epochs, each
epoch a seeded permutation, and batch `s` takes stream positions `[s·B, (s+1)·B)`. Resuming at step `s` needs
no iterator state, and a process of a multi-host job reads only its own slice of the rows. Query embeddings
are read by row with asynchronous tensorstore reads issued `prefetch` steps ahead; the qrels are small and
held in memory. A batch carries `queries`, `positive_ids` and `positive_weights`, plus the fields of the batch
signals the loss terms asked for (`signals.py`).
"""

from __future__ import annotations

import collections
from typing import Iterator, Sequence

import numpy as np

from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.data.signals import BatchRows, BatchSignal, EpochStream
from esep_jax.errors import InputError

PADDING = -1


class TrainBatches:
    """Batches of training queries with their positives (doc rows and grade weights, padded with -1)."""

    def __init__(self, dataset: Dataset, qrels: Qrels, *, batch_size: int, max_positives: int, seed: int,
                 grade_weighting: str = "linear", relevance_level: int = 1, prefetch: int = 2,
                 shard_index: int = 0, shard_count: int = 1, signals: Sequence[BatchSignal] = ()):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.prefetch = prefetch
        self.shard_index, self.shard_count = shard_index, shard_count
        positives = _positive_lists(qrels, relevance_level, grade_weighting)
        self.query_rows = positives[0]
        if not self.query_rows.size:
            raise InputError(f"no training query has a judgement with grade >= {relevance_level}")
        self.num_positives = int(min(max_positives, positives[1].max()))
        self._lengths, self._ids, self._weights, self._long = _padded(positives, self.num_positives)
        # Stream 0 keeps its original seeding ([seed, epoch]), so batches equal those of earlier versions.
        self.stream = EpochStream(self.num_queries, batch_size, shard_count, seed=lambda epoch: [seed, epoch])
        self.signals = list(signals)

    @property
    def num_queries(self) -> int:
        return int(self.query_rows.shape[0])

    def indices_at(self, step: int) -> np.ndarray:
        """Indices into the training queries of this process's slice of global batch `step`."""
        return self.stream.indices(step, self.shard_index)

    def _positives_at(self, step: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, weights = self._ids[indices].copy(), self._weights[indices].copy()
        # A query with more positives than fit gets a fresh sample each step, so every positive is seen over time.
        rng = np.random.default_rng([self.seed, step, self.shard_index, 1])
        for row in np.flatnonzero(self._lengths[indices] > self.num_positives):
            docs, grade_weights = self._long[int(indices[row])]
            keep = np.sort(rng.choice(len(docs), self.num_positives, replace=False))
            ids[row], weights[row] = docs[keep], grade_weights[keep]
        return ids, weights

    def _start(self, step: int):
        indices = self.indices_at(step)
        rows = self.query_rows[indices]
        ids, weights = self._positives_at(step, indices)
        context = BatchRows(step, self.shard_index, rows, ids, weights)
        return (self.dataset.query_table()[rows].read(), ids, weights,
                [signal.start(context) for signal in self.signals])

    def _finish(self, pending) -> dict[str, np.ndarray]:
        queries, ids, weights, started = pending
        batch = {"queries": queries.result().astype(np.float32), "positive_ids": ids, "positive_weights": weights}
        for signal, signal_pending in zip(self.signals, started):
            batch.update(signal.finish(signal_pending))
        return batch

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of batch `step`: queries [b, d], positive_ids [b, P], positive_weights [b, P],
        plus the fields of the signals (see signals.py)."""
        return self._finish(self._start(step))

    def iterate(self, start_step: int, stop_step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields (step, batch) for steps in [start, stop), keeping `prefetch` reads in flight."""
        pending: collections.deque = collections.deque()
        next_step = start_step
        for step in range(start_step, stop_step):
            while next_step < stop_step and next_step <= step + self.prefetch:
                pending.append(self._start(next_step))
                next_step += 1
            yield step, self._finish(pending.popleft())


def _positive_lists(qrels: Qrels, relevance_level: int, grade_weighting: str):
    """(query rows [n], positive counts [n], doc rows (CSR, concatenated), weights, offsets [n + 1]) of the
    queries with at least one judgement >= relevance_level."""
    query_of = np.repeat(np.arange(qrels.num_queries), np.diff(qrels.offsets))
    relevant = qrels.grades >= relevance_level
    owners = query_of[relevant]
    counts = np.bincount(owners, minlength=qrels.num_queries)
    has_any = counts > 0
    grades = qrels.grades[relevant].astype(np.float32)
    weights = grades if grade_weighting == "linear" else np.ones_like(grades)
    kept_counts = counts[has_any]
    offsets = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)
    return (qrels.query_rows[has_any].astype(np.int64), kept_counts, qrels.doc_rows[relevant].astype(np.int32),
            weights, offsets)


def _padded(positives, width: int):
    """Positives as padded `[n, width]` arrays (first `width` of each query), plus the full lists of the queries
    that have more (sampled per step)."""
    _, counts, docs, weights, offsets = positives
    n = counts.shape[0]
    ids = np.full((n, width), PADDING, np.int32)
    padded_weights = np.zeros((n, width), np.float32)
    columns = np.arange(docs.shape[0]) - np.repeat(offsets[:-1], counts)
    fits = columns < width
    owners = np.repeat(np.arange(n), counts)
    ids[owners[fits], columns[fits]] = docs[fits]
    padded_weights[owners[fits], columns[fits]] = weights[fits]
    long = {int(i): (docs[offsets[i]:offsets[i + 1]], weights[offsets[i]:offsets[i + 1]])
            for i in np.flatnonzero(counts > width)}
    return counts, ids, padded_weights, long
