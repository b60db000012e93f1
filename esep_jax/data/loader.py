"""Deterministic, step-addressed training batches streamed from tensorstore.

Batch `s` is a pure function of (seed, s): the stream of judged training queries is cut into epochs, each
epoch a seeded permutation, and batch `s` takes stream positions `[s·B, (s+1)·B)`. Resuming at step `s` needs
no iterator state, and a process of a multi-host job reads only its own slice of the rows. Query embeddings
are read by row with asynchronous tensorstore reads issued `prefetch` steps ahead; the qrels are small and
held in memory.
"""

from __future__ import annotations

import collections
from typing import Iterator

import numpy as np

from esep_jax.data.batch_signals import SampledCandidates, TeacherCandidates
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.errors import InputError

PADDING = -1


class TrainBatches:
    """Batches of training queries with their positives (doc rows and grade weights, padded with -1)."""

    def __init__(self, dataset: Dataset, qrels: Qrels, *, batch_size: int, max_positives: int, seed: int,
                 grade_weighting: str = "linear", relevance_level: int = 1, prefetch: int = 2,
                 shard_index: int = 0, shard_count: int = 1, sampled: SampledCandidates | None = None,
                 teacher: TeacherCandidates | None = None, query_targets: bool = False, paired: bool = False):
        if batch_size % shard_count:
            raise InputError(f"batch size {batch_size} is not divisible by {shard_count} shards",
                             field="config.train.batch_size")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.prefetch = prefetch
        self.shard_index, self.shard_count = shard_index, shard_count
        self.query_rows, self.positives, self.weights = _positive_lists(qrels, relevance_level, grade_weighting)
        if not self.query_rows.size:
            raise InputError(f"no training query has a judgement with grade >= {relevance_level}")
        self.num_positives = int(min(max_positives, max(len(p) for p in self.positives)))
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        # Optional signals (see batch_signals.py and the dataset's drift tables): each adds batch fields.
        self.sampled, self.teacher = sampled, teacher
        self.query_targets = query_targets
        self.num_paired = dataset.num_paired if paired else 0
        if paired and not self.num_paired:
            raise InputError("the dataset has no paired texts (see `esep-jax ingest --paired-source`)",
                             file=dataset.location, field="paired")

    @property
    def num_queries(self) -> int:
        return int(self.query_rows.shape[0])

    def _permutation(self, epoch: int, stream: int = 0) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 8:
                self._permutations.pop(min(self._permutations))
            size = self.num_queries if stream == 0 else self.num_paired
            # Stream 0 keeps its original seeding, so runs without paired texts are unchanged.
            seed = [self.seed, epoch] if stream == 0 else [self.seed, epoch, stream]
            self._permutations[key] = np.random.default_rng(seed).permutation(size)
        return self._permutations[key]

    def indices_at(self, step: int, stream: int = 0) -> np.ndarray:
        """Indices (into the training queries, or the paired texts for stream 1) of this process's slice of
        global batch `step`."""
        local = self.batch_size // self.shard_count
        positions = step * self.batch_size + self.shard_index * local + np.arange(local, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_queries if stream == 0 else self.num_paired)
        return np.array([self._permutation(int(e), stream)[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def _positives_at(self, step: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, self.shard_index, 1])
        ids = np.full((len(indices), self.num_positives), PADDING, dtype=np.int32)
        weights = np.zeros((len(indices), self.num_positives), dtype=np.float32)
        for row, index in enumerate(indices):
            docs, grade_weights = self.positives[index], self.weights[index]
            if len(docs) > self.num_positives:  # a fresh sample each step, so every positive is seen over time
                keep = np.sort(rng.choice(len(docs), self.num_positives, replace=False))
                docs, grade_weights = docs[keep], grade_weights[keep]
            ids[row, :len(docs)] = docs
            weights[row, :len(docs)] = grade_weights
        return ids, weights

    def _start(self, step: int):
        indices = self.indices_at(step)
        rows = self.query_rows[indices]
        reads = {"queries": self.dataset.query_table()[rows].read()}
        if self.query_targets:
            reads["target_vectors"] = self.dataset.table("queries/targets")[rows].read()
        if self.num_paired:
            paired_rows = self.indices_at(step, stream=1)
            reads["paired_source"] = self.dataset.table("paired/source")[paired_rows].read()
            reads["paired_target"] = self.dataset.table("paired/target")[paired_rows].read()
        return step, rows, reads, self._positives_at(step, indices)

    def _finish(self, pending) -> dict[str, np.ndarray]:
        step, rows, reads, (ids, weights) = pending
        batch = {name: read.result().astype(np.float32) for name, read in reads.items()}
        batch.update(positive_ids=ids, positive_weights=weights)
        if self.sampled is not None:
            batch.update(self.sampled.fields(step, self.shard_index, rows, ids, weights))
        if self.teacher is not None:
            batch.update(self.teacher.fields(rows))
        return batch

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of batch `step`: queries [b, d], positive_ids [b, P], positive_weights [b, P],
        plus the fields of whichever signals are on (batch_signals.py; target_vectors [b, d_c];
        paired_source [b, d_q] and paired_target [b, d_c])."""
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
    rows, positives, weights = [], [], []
    for i in range(qrels.num_queries):
        docs, grades = qrels.judgements(i)
        relevant = grades >= relevance_level
        if relevant.any():
            rows.append(qrels.query_rows[i])
            positives.append(docs[relevant].astype(np.int32))
            grade = grades[relevant].astype(np.float32)
            weights.append(grade if grade_weighting == "linear" else np.ones_like(grade))
    return np.array(rows, dtype=np.int64), positives, weights
