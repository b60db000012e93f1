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
# A query table up to this size is read into memory once; larger ones are streamed by rows from tensorstore.
CACHE_QUERY_BYTES = 256 << 20


class TrainBatches:
    """Batches of training queries with their positives (doc rows and grade weights, padded with -1)."""

    def __init__(self, dataset: Dataset, qrels: Qrels, *, batch_size: int, max_positives: int, seed: int,
                 grade_weighting: str = "linear", relevance_level: int = 1, prefetch: int = 2,
                 shard_index: int = 0, shard_count: int = 1, signals: Sequence[BatchSignal] = (),
                 positive_rows: np.ndarray | None = None):
        """`positive_rows` ([N] int, optional): maps each corpus row to its row in the task's corpus table when
        that table holds only some documents; a batch's `positive_ids` are then rows of that table (signals
        still see corpus rows)."""
        self.dataset = dataset
        self.positive_rows = positive_rows
        self.batch_size = batch_size
        self.seed = seed
        self.prefetch = prefetch
        self.shard_index, self.shard_count = shard_index, shard_count
        positives = _positive_lists(qrels, relevance_level, grade_weighting)
        self.query_rows = positives[0]
        if not self.query_rows.size:
            raise InputError(f"no training query has a judgement with grade >= {relevance_level}")
        self.num_positives = int(min(max_positives, positives[1].max()))
        self._lengths, self._ids, self._weights, (self._long_slot, self._long_ids, self._long_weights) = _padded(
            positives, self.num_positives, np.random.default_rng([seed, 3]))
        table = dataset.query_table()
        self._cached = (dataset.read_queries(np.arange(table.shape[0])) if table.shape[0] * table.shape[1] * 4
                        <= CACHE_QUERY_BYTES else None)
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
        ids, weights = self._ids[indices], self._weights[indices]
        # A query with more positives than fit gets a fresh sample each step, so every positive is seen over time:
        # a window of `num_positives` consecutive positives, at a random offset, of the query's positives in a
        # seeded random order (each positive equally likely). Vectorised over the batch's rows: O(rows · P).
        rows = np.flatnonzero(self._lengths[indices] > self.num_positives)
        if rows.size:
            slots = self._long_slot[indices[rows]]
            lengths = self._lengths[indices[rows]]
            rng = np.random.default_rng([self.seed, step, self.shard_index, 1])
            columns = (rng.integers(0, lengths)[:, None] + np.arange(self.num_positives)) % lengths[:, None]
            ids[rows] = self._long_ids[slots[:, None], columns]
            weights[rows] = self._long_weights[slots[:, None], columns]
        return ids, weights

    def _start(self, step: int):
        indices = self.indices_at(step)
        rows = self.query_rows[indices]
        ids, weights = self._positives_at(step, indices)
        context = BatchRows(step, self.shard_index, rows, ids, weights)
        started = [signal.start(context) for signal in self.signals]
        if self._cached is not None:
            return self._cached[rows], ids, weights, started
        # Each distinct row is read once (a large batch of a small split repeats rows many times).
        unique, inverse = np.unique(rows, return_inverse=True)
        return (self.dataset.query_table()[unique].read(), inverse), ids, weights, started

    def _finish(self, pending) -> dict[str, np.ndarray]:
        queries, ids, weights, started = pending
        if isinstance(queries, tuple):  # an asynchronous read of the distinct rows
            read, inverse = queries
            queries = read.result().astype(np.float32)[inverse]
        if self.positive_rows is not None:
            ids = np.where(ids >= 0, self.positive_rows[np.maximum(ids, 0)], PADDING).astype(np.int32)
        batch = {"queries": queries, "positive_ids": ids, "positive_weights": weights}
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


def _padded(positives, width: int, rng: np.random.Generator):
    """Positives as padded `[n, width]` arrays (the first `width` of each query), and the queries that have
    more as (slot of each query [n], their full lists, each in a random order, padded to the longest: ids and
    weights `[n_long, max]`)."""
    _, counts, docs, weights, offsets = positives
    # Shuffle within each query (a random key per positive, sorted within its query's CSR segment).
    order = np.lexsort((rng.random(docs.shape[0]), np.repeat(np.arange(counts.shape[0]), counts)))
    long_rows = np.repeat(counts > width, counts)
    shuffled = np.where(long_rows, order, np.arange(docs.shape[0]))  # queries that fit keep their order
    docs, weights = docs[shuffled], weights[shuffled]
    n = counts.shape[0]
    columns = np.arange(docs.shape[0]) - np.repeat(offsets[:-1], counts)
    owners = np.repeat(np.arange(n), counts)

    def pad(rows: np.ndarray, size: int, limit: int):
        ids = np.full((size, limit), PADDING, np.int32)
        padded_weights = np.zeros((size, limit), np.float32)
        fits = columns < limit
        mask = fits & (rows[owners] >= 0)
        ids[rows[owners[mask]], columns[mask]] = docs[mask]
        padded_weights[rows[owners[mask]], columns[mask]] = weights[mask]
        return ids, padded_weights

    ids, padded_weights = pad(np.arange(n), n, width)
    long = counts > width
    slot = np.where(long, np.cumsum(long) - 1, -1)
    long_ids, long_weights = pad(slot, int(long.sum()), int(counts.max(initial=0)) if long.any() else 1)
    return counts, ids, padded_weights, (slot, long_ids, long_weights)
