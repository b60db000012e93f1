"""Evaluation of a split: exact retrieval with or without a head, trec_eval metrics, TREC run files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.evaluation.metrics import DEFAULT_CUTOFFS, doc_id_ranks, mean_metrics, per_query_metrics, trec_order
from esep_jax.evaluation.retrieval import ExactIndex

QueryTransform = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass
class Ranking:
    """A run over the judged queries of a split, with its metrics."""

    doc_rows: np.ndarray  # [Q_s, k] int32
    scores: np.ndarray  # [Q_s, k] float32
    per_query: dict[str, np.ndarray]
    metrics: dict[str, float]


class SplitEvaluator:
    """Evaluates transforms of one split's queries against a fixed device-resident corpus index.

    Built once and reused: the trainer evaluates dev every N steps without re-reading anything.
    """

    def __init__(self, dataset: Dataset, qrels: Qrels, index: ExactIndex, *, top_k: int = 1000,
                 query_chunk: int = 1024, relevance_level: int = 1, cutoffs=DEFAULT_CUTOFFS):
        self.dataset, self.qrels, self.index = dataset, qrels, index
        self.top_k, self.query_chunk, self.relevance_level = top_k, query_chunk, relevance_level
        self.cutoffs = tuple(k for k in cutoffs if k <= max(top_k, 1))
        self.queries = dataset.read_queries(qrels.query_rows)
        self.doc_id_rank = doc_id_ranks(dataset.ids("corpus"))

    def rank(self, transform: QueryTransform | None = None) -> Ranking:
        """Retrieves for every judged query (through `transform` if given) and scores the run.

        Without a transform, queries of another dimension than the corpus (a drift dataset) are zero-padded or
        truncated to it — what the untrained identity head computes.
        """
        return self.rank_vectors(self.base_vectors() if transform is None else self.transformed(transform))

    def transformed(self, transform: QueryTransform) -> np.ndarray:
        """The judged queries through `transform`, in chunks of `query_chunk`."""
        return np.concatenate([np.asarray(transform(self.queries[start:start + self.query_chunk]))
                               for start in range(0, len(self.queries), self.query_chunk)])

    def base_vectors(self) -> np.ndarray:
        """The judged queries as the base system uses them: padded or truncated to the corpus dimension."""
        dim = self.index.dim
        if self.queries.shape[1] >= dim:
            return self.queries[:, :dim]
        return np.pad(self.queries, ((0, 0), (0, dim - self.queries.shape[1])))

    def rank_vectors(self, vectors: np.ndarray, index: ExactIndex | None = None) -> Ranking:
        """Retrieves with ready-made query vectors, one per judged query (in `self.queries` order), from
        `index` (default: this evaluator's; e.g. a truncated index of the same corpus)."""
        rows, scores = (index or self.index).search(vectors, self.top_k, self.query_chunk)
        per_query = per_query_metrics(rows, scores, self.qrels, self.doc_id_rank, self.cutoffs,
                                      self.relevance_level)
        return Ranking(rows, scores, per_query, mean_metrics(per_query))

    def write_trec_run(self, ranking: Ranking, path: str | Path, run_name: str) -> None:
        """Writes `qid Q0 docid rank score run_name` lines, ranked the way trec_eval reads them."""
        query_ids, doc_ids = self.dataset.ids("queries"), self.dataset.ids("corpus")
        order = trec_order(ranking.scores, ranking.doc_rows, self.doc_id_rank)
        lines = []
        for i, query_row in enumerate(self.qrels.query_rows):
            for rank, j in enumerate(order[i], start=1):
                # %.9g round-trips float32 exactly, so trec_eval reading this file sees the same ties.
                lines.append(f"{query_ids[query_row]} Q0 {doc_ids[ranking.doc_rows[i, j]]} {rank} "
                             f"{float(ranking.scores[i, j]):.9g} {run_name}")
        atomic_write_text(path, "\n".join(lines) + "\n")
