"""Training signals beyond the positives, gathered on the host for each batch.

The loader hands every batch's query rows and positives to these builders, which add fields the train step
turns into loss terms:

- `SampledCandidates` (loss.kind=sampled): per query, its positives, its mined hard negatives and R uniform
  random negatives, *with their vectors*, so the device never holds the corpus. Random slots carry the log-Q
  correction `log(|A| / R)` (A = the contrasted documents, drawn uniformly with replacement), which makes
  the sampled normaliser an unbiased estimate of the full-corpus one. Repeated fixed slots and accidental
  hits (a random draw equal to a positive or hard negative) are masked out.
- `TeacherCandidates` (loss.teacher): each query's teacher candidates, their vectors and teacher scores.

Both are pure functions of (seed, step, shard, query rows), so batches stay step-addressed and resume exact.
Vectors come from a host copy of the corpus (host memory is far larger than device memory; gathering a few
hundred rows per query from it costs less than a tensorstore round trip per step).
"""

from __future__ import annotations

import numpy as np

from esep_jax.data.candidates import Candidates


def _first_occurrence(ids: np.ndarray) -> np.ndarray:
    """`[B, C]` True where a slot's id appears for the first time in its row (ids < 0 are never first)."""
    order = np.argsort(ids, axis=1, kind="stable")
    ordered = np.take_along_axis(ids, order, axis=1)
    repeat = np.zeros_like(ids, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first & (ids >= 0)


class SampledCandidates:
    """Builds `candidate_vectors [b, C, d]`, `candidate_bias`, `candidate_mask`, `candidate_targets [b, C]`."""

    def __init__(self, corpus: np.ndarray, contrasted: np.ndarray, *, hard_negatives: Candidates | None,
                 random_negatives: int, seed: int):
        self.corpus = corpus
        self.contrasted = contrasted
        self.contrasted_rows = np.flatnonzero(contrasted).astype(np.int32)
        self.hard_negatives = hard_negatives
        self.random_negatives = random_negatives
        self.seed = seed

    def fields(self, step: int, shard: int, query_rows: np.ndarray, positive_ids: np.ndarray,
               positive_weights: np.ndarray) -> dict[str, np.ndarray]:
        batch = len(query_rows)
        parts = [positive_ids]
        if self.hard_negatives is not None:
            parts.append(self.hard_negatives.lookup(query_rows)[0].astype(np.int32))
        fixed = np.concatenate(parts, axis=1)
        # A hard negative outside the contrasted set (e.g. negatives=judged) is dropped like any other.
        fixed_ok = (fixed >= 0) & self.contrasted[np.maximum(fixed, 0)]
        fixed = np.where(fixed_ok | (np.arange(fixed.shape[1]) < positive_ids.shape[1]), fixed, -1)
        rng = np.random.default_rng([self.seed, step, shard, 2])
        draws = self.contrasted_rows[rng.integers(0, len(self.contrasted_rows), (batch, self.random_negatives))]
        ids = np.concatenate([fixed, draws], axis=1)
        # Draws are uniform over all contrasted documents A, and a draw that hits a fixed slot counts zero, so
        # (|A| / R) Σ_r exp(s_r) is an unbiased estimate of the sum over the other documents. Repeated draws
        # are separate samples and stay in.
        hits_fixed = (draws[:, :, None] == fixed[:, None, :]).any(axis=2)
        mask = np.concatenate([_first_occurrence(fixed), ~hits_fixed], axis=1)
        bias = np.zeros(ids.shape, np.float32)
        if self.random_negatives:
            bias[:, fixed.shape[1]:] = np.log(len(self.contrasted_rows) / self.random_negatives)
        targets = np.zeros(ids.shape, np.float32)
        weights = np.where(positive_ids >= 0, positive_weights, 0.0)
        totals = weights.sum(axis=1, keepdims=True)
        targets[:, :positive_ids.shape[1]] = weights / np.where(totals > 0, totals, 1.0)
        targets = np.where(mask, targets, 0.0)
        return {"candidate_vectors": self.corpus[np.maximum(ids, 0)].astype(np.float32),
                "candidate_bias": bias, "candidate_mask": mask, "candidate_targets": targets}


class TeacherCandidates:
    """Builds `teacher_vectors [b, T, d]`, `teacher_scores [b, T]`, `teacher_mask [b, T]`."""

    def __init__(self, corpus: np.ndarray, teacher: Candidates):
        self.corpus = corpus
        self.teacher = teacher

    def fields(self, query_rows: np.ndarray) -> dict[str, np.ndarray]:
        rows, scores = self.teacher.lookup(query_rows)
        mask = rows >= 0
        return {"teacher_vectors": self.corpus[np.maximum(rows, 0)].astype(np.float32),
                "teacher_scores": np.where(mask, scores, 0.0).astype(np.float32), "teacher_mask": mask}
