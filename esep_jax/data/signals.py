"""Batch signals: the fields a batch carries beyond its queries and positives, built only when a loss term
asks for them by name (`Term.signals` in `esep_jax/objectives/`).

| name | fields | what |
|---|---|---|
| `sampled_candidates` | candidate_vectors [b, C, d], candidate_bias, candidate_mask, candidate_targets [b, C] | positives + mined hard negatives + R uniform draws with the log-Q correction `log(|A| / R)` (A = the contrasted documents), so the sampled normaliser estimates the full-corpus one without bias |
| `teacher_candidates` | teacher_vectors [b, T, d], teacher_scores, teacher_mask [b, T] | each query's teacher candidates and scores |
| `query_targets` | target_vectors [b, d_c] | the dataset's `queries/targets` rows (query drift) |
| `paired_texts` | paired_source [b, d_q], paired_target [b, d_c] | a step-addressed stream of the dataset's paired texts |

Every signal is a pure function of (seed, step, shard, query rows), so batches stay step-addressed and resume is
exact. Candidate vectors are gathered from a host copy of the corpus (host memory is far larger than device
memory; gathering a few hundred rows per query costs less than a tensorstore round trip per step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from esep_jax.config import Config
from esep_jax.data.candidates import Candidates, read_candidates
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """What a signal knows of the batch it adds fields to."""

    step: int
    shard: int  # this process's index among the processes reading the batch
    query_rows: np.ndarray  # [b] rows of the dataset's query table
    positive_ids: np.ndarray  # [b, P] corpus rows, -1 = padding
    positive_weights: np.ndarray  # [b, P]


class BatchSignal:
    """`start` issues any reads for a batch (called `prefetch` steps ahead); `finish` returns its fields."""

    def start(self, rows: BatchRows) -> Any:
        return rows

    def finish(self, pending: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _first_occurrence(ids: np.ndarray) -> np.ndarray:
    """`[B, C]` True where a slot's id appears for the first time in its row (ids < 0 are never first)."""
    order = np.argsort(ids, axis=1, kind="stable")
    ordered = np.take_along_axis(ids, order, axis=1)
    repeat = np.zeros_like(ids, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first & (ids >= 0)


class SampledCandidates(BatchSignal):
    """Per query: its positives, its hard negatives and R draws from the contrasted documents, with vectors."""

    def __init__(self, corpus: np.ndarray, contrasted: np.ndarray, *, hard_negatives: Candidates | None,
                 random_negatives: int, seed: int):
        self.corpus = corpus
        self.contrasted = contrasted
        self.contrasted_rows = np.flatnonzero(contrasted).astype(np.int32)
        self.hard_negatives = hard_negatives
        self.random_negatives = random_negatives
        self.seed = seed

    def finish(self, rows: BatchRows) -> dict[str, np.ndarray]:
        positive_ids, positive_weights = rows.positive_ids, rows.positive_weights
        batch = len(rows.query_rows)
        parts = [positive_ids]
        if self.hard_negatives is not None:
            parts.append(self.hard_negatives.lookup(rows.query_rows)[0].astype(np.int32))
        fixed = np.concatenate(parts, axis=1)
        # A hard negative outside the contrasted set (e.g. negatives=judged) is dropped like any other.
        fixed_ok = (fixed >= 0) & self.contrasted[np.maximum(fixed, 0)]
        fixed = np.where(fixed_ok | (np.arange(fixed.shape[1]) < positive_ids.shape[1]), fixed, -1)
        rng = np.random.default_rng([self.seed, rows.step, rows.shard, 2])
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


class TeacherCandidates(BatchSignal):
    """Each query's teacher candidates, their vectors and the teacher's scores."""

    def __init__(self, corpus: np.ndarray, teacher: Candidates):
        self.corpus = corpus
        self.teacher = teacher

    def finish(self, rows: BatchRows) -> dict[str, np.ndarray]:
        doc_rows, scores = self.teacher.lookup(rows.query_rows)
        mask = doc_rows >= 0
        return {"teacher_vectors": self.corpus[np.maximum(doc_rows, 0)].astype(np.float32),
                "teacher_scores": np.where(mask, scores, 0.0).astype(np.float32), "teacher_mask": mask}


class QueryTargets(BatchSignal):
    """The target vector of each of the batch's queries (read asynchronously from tensorstore)."""

    def __init__(self, dataset: Dataset):
        self.table = dataset.table("queries/targets")

    def start(self, rows: BatchRows):
        return self.table[np.asarray(rows.query_rows, np.int64)].read()

    def finish(self, pending) -> dict[str, np.ndarray]:
        return {"target_vectors": pending.result().astype(np.float32)}


class PairedTexts(BatchSignal):
    """A batch of paired texts per step: stream positions `[s·B, (s+1)·B)` of seeded per-epoch permutations of
    the paired rows (this process's slice), read asynchronously."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, shard_count: int):
        if not dataset.num_paired:
            raise InputError("the dataset has no paired texts (see `esep-jax ingest --paired-source`)",
                             file=dataset.location, field="paired")
        self.stream = EpochStream(dataset.num_paired, batch_size, shard_count, seed=lambda epoch: [seed, epoch, 1])
        self.source, self.target = dataset.table("paired/source"), dataset.table("paired/target")

    def start(self, rows: BatchRows):
        paired_rows = self.stream.indices(rows.step, rows.shard)
        return self.source[paired_rows].read(), self.target[paired_rows].read()

    def finish(self, pending) -> dict[str, np.ndarray]:
        source, target = pending
        return {"paired_source": source.result().astype(np.float32),
                "paired_target": target.result().astype(np.float32)}


class EpochStream:
    """Step-addressed indices into `size` items: batch `s` takes positions `[s·B, (s+1)·B)` of a stream cut into
    epochs, each a permutation seeded by `seed(epoch)`; a shard takes its contiguous slice of each batch."""

    def __init__(self, size: int, batch_size: int, shard_count: int, seed: Callable[[int], list]):
        if batch_size % shard_count:
            raise InputError(f"batch size {batch_size} is not divisible by {shard_count} processes",
                             field="config.train.batch_size")
        self.size, self.batch_size, self.local = size, batch_size, batch_size // shard_count
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 8:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng(self.seed(epoch)).permutation(self.size)
        return self._permutations[epoch]

    def indices(self, step: int, shard: int) -> np.ndarray:
        positions = step * self.batch_size + shard * self.local + np.arange(self.local, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.size)
        out = np.empty(self.local, np.int64)
        for epoch in np.unique(epochs):  # a batch spans one or two epochs (more only for tiny datasets)
            here = epochs == epoch
            out[here] = self.permutation(int(epoch))[offsets[here]]
        return out


@dataclasses.dataclass(frozen=True)
class SignalSources:
    """What signal builders may draw on, prepared once by the trainer."""

    config: Config
    dataset: Dataset
    corpus: np.ndarray  # the host corpus
    scored_corpus: np.ndarray  # the rows the task loss scores (the corpus, or its Matryoshka prefixes)
    contrasted: np.ndarray  # [N] bool: documents the task softmax contrasts against
    shard_count: int


def _sampled(sources: SignalSources) -> BatchSignal:
    loss = sources.config.loss
    hard = read_candidates(sources.dataset, loss.hard_negatives, field="config.loss.hard_negatives") \
        if loss.hard_negatives else None
    return SampledCandidates(sources.scored_corpus, sources.contrasted, hard_negatives=hard,
                             random_negatives=loss.random_negatives, seed=sources.config.train.seed)


def _teacher(sources: SignalSources) -> BatchSignal:
    teacher = read_candidates(sources.dataset, sources.config.loss.teacher, field="config.loss.teacher")
    return TeacherCandidates(sources.corpus, teacher)


def _query_targets(sources: SignalSources) -> BatchSignal:
    return QueryTargets(sources.dataset)


def _paired_texts(sources: SignalSources) -> BatchSignal:
    train = sources.config.train
    return PairedTexts(sources.dataset, batch_size=train.batch_size, seed=train.seed,
                       shard_count=sources.shard_count)


SIGNALS: dict[str, Callable[[SignalSources], BatchSignal]] = {
    "sampled_candidates": _sampled, "teacher_candidates": _teacher, "query_targets": _query_targets,
    "paired_texts": _paired_texts}


def build_signals(names, sources: SignalSources) -> list[BatchSignal]:
    """The signals named (sorted, so batches are assembled in one order)."""
    unknown = sorted(set(names) - set(SIGNALS))
    if unknown:
        raise ValueError(f"unknown batch signals {unknown} (known: {', '.join(sorted(SIGNALS))})")
    return [SIGNALS[name](sources) for name in sorted(names)]
