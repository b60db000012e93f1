"""Model selection on dev: scoring every member at an evaluation, and the record each member keeps.

The record (best parameters, best score and step, evaluations since the best, stopped) lives in the train
state and is updated by the pure `record_evaluation`, so a resumed run continues it bit for bit. The identity
head is scored before the first step, so a member's selected head is never worse on dev than the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.config import Config
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.evaluation.evaluator import SplitEvaluator
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.evaluation.views import harm_test, unseen_metrics, unseen_per_query
from esep_jax.objectives.matryoshka import truncated_index_rows
from esep_jax.runs.state import TrainState


VIEW_METRICS = ("ndcg@10", "recall@100")


class DevSelection:
    """Scores members' query vectors on the dev queries; a Matryoshka run is scored on the mean over its
    prefixes and the full dimension. With `seen` (documents relevant in the training judgements used), every
    evaluation also reports the new-documents view: dev queries scored on their relevant documents that were
    never training positives (`evaluation/views.py`) — reported, not selected on."""

    def __init__(self, config: Config, dataset: Dataset, dev_qrels: Qrels, index, seen: np.ndarray | None = None,
                 host_corpus: np.ndarray | None = None, dtype=np.float32):
        """`index`: the corpus index dev retrieves from (an `ExactIndex`, or the trainer's `ShardedExactIndex`
        over its own corpus shards); `host_corpus` is needed only for Matryoshka prefixes."""
        ec = config.eval
        self.metric, self.seen, self.relevance_level = config.train.select_metric, seen, ec.relevance_level
        # Dev ranks only as deep as its metrics look (the selection metric, and the @10/@100 it reports): a
        # top-100 is exact for them and much cheaper than the 1,000 of a test run.
        depth = min(ec.top_k, max(100, int(self.metric.split("@")[1])))
        self.evaluator = SplitEvaluator(dataset, dev_qrels, index, top_k=depth, query_chunk=ec.query_chunk,
                                        relevance_level=ec.relevance_level)
        self.prefixes = [(k, SplitEvaluator(dataset, dev_qrels, ExactIndex(truncated_index_rows(host_corpus, k),
                                                                           ec.corpus_chunk, dtype),
                                            top_k=depth, query_chunk=ec.query_chunk,
                                            relevance_level=ec.relevance_level))
                         for k in sorted(set(config.loss.matryoshka_dims))]

    @property
    def queries(self) -> np.ndarray:
        return self.evaluator.queries

    def base_metrics(self) -> dict:
        return self.views(self.evaluator.base_vectors())

    def views(self, vectors: np.ndarray) -> dict:
        """Metrics of dev query vectors, with the new-documents view under `new_documents` when there is one."""
        ranking = self.evaluator.rank_vectors(vectors)
        metrics = dict(ranking.metrics)
        if self.seen is not None:
            queries, view = unseen_metrics(ranking, self.evaluator.qrels, self.seen, self.relevance_level,
                                           self.evaluator.doc_id_rank, self.evaluator.cutoffs)
            if view is not None:
                metrics["new_documents"] = {"queries": queries, **{name: view[name] for name in VIEW_METRICS}}
        return metrics

    def harm(self, vectors: np.ndarray, tolerance: float) -> dict | None:
        """The paired harm test (views.harm_test) of these vectors against the base on the new-documents view."""
        if self.seen is None:
            return None
        per_query = [unseen_per_query(self.evaluator.rank_vectors(v), self.evaluator.qrels, self.seen,
                                      self.relevance_level, self.evaluator.doc_id_rank, self.evaluator.cutoffs)
                     for v in (self.evaluator.base_vectors(), vectors)]
        if per_query[0] is None:
            return None
        return harm_test(per_query[0]["ndcg@10"], per_query[1]["ndcg@10"], tolerance)

    def worst_case_gain(self, vectors: np.ndarray, base: dict) -> float:
        """The smaller gain over the base (`base_metrics()`) of the selection metric in-domain and nDCG@10 on
        the new-documents view — what `ensemble.combine="worst_case"` maximises. Without that view it is the
        in-domain gain."""
        metrics = self.views(vectors)
        gains = [metrics[self.metric] - base[self.metric]]
        if "new_documents" in metrics and "new_documents" in base:
            gains.append(metrics["new_documents"]["ndcg@10"] - base["new_documents"]["ndcg@10"])
        return float(min(gains))

    def score(self, vectors: np.ndarray) -> tuple[float, dict]:
        """(selection score, metrics to log) of one member's dev query vectors."""
        metrics = self.views(vectors)
        score = metrics[self.metric]
        if self.prefixes:
            by_prefix = {str(k): e.rank_vectors(vectors[:, :k]).metrics[self.metric] for k, e in self.prefixes}
            metrics = {**metrics, "prefix_" + self.metric: by_prefix}
            score = float(np.mean([score, *by_prefix.values()]))
        return float(score), metrics


def record_evaluation(state: TrainState, score: jax.Array, step: jax.Array, patience: int,
                      min_improvement: float = 0.0) -> TrainState:
    """The early-stopping update for dev scores `[E]`, as a pure function (jit it with the state's shardings).

    Scores are compared in float32, the precision the record is kept in, so a tie never counts as an
    improvement; the first evaluation (best_score = -inf) always does; a gain of `min_improvement` or less
    does not.
    """
    improved = score > state.best_score + min_improvement  # [E]: members keep separate records
    stale = jnp.where(improved, 0, state.evals_since_best + 1)

    def keep_best(best, now):
        return jnp.where(improved.reshape((-1,) + (1,) * (now.ndim - 1)), now, best)

    return state.replace(
        best_params=jax.tree.map(keep_best, state.best_params, state.params),
        best_score=jnp.where(improved, score, state.best_score),
        best_step=jnp.where(improved, step, state.best_step),
        evals_since_best=stale, stopped=state.stopped | (stale >= patience))
