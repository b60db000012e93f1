"""Query drift compensation: how much of a new encoder's quality survives on an old encoder's index.

Encoder A built the index; encoder B is the new query encoder. A *drift dataset* is an ordinary dataset
whose corpus is A's and whose queries are B's (`esep-jax ingest --queries B.npy --allow-different-dims`),
optionally with A's embedding of each query (`--query-targets A.npy`) and texts embedded by both
(`--paired-source/--paired-target`). Rather than re-embedding the corpus with B, a map `f` sends B's query
vectors into A's space. `drift_report` (`esep-jax drift`) measures, on one split:

- `A native`: A's queries on A's index (needs the query targets);
- `B native`: B's queries on B's own index (needs B's corpus), the quality re-indexing would give;
- one row per closed-form map (`fit_drift_maps`) and per trained run (`--workdir`): B's queries through
  the map, searched on A's index;

with `retention = metric ÷ B native` (Drift-Adapter's measure).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from esep_jax.data.dataset import Dataset
from esep_jax.evaluation.evaluator import SplitEvaluator
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.heads import closed_form
from esep_jax.runs.trained_run import TrainedRun

DEFAULT_METRICS = ("ndcg@10", "recall@100")


def fit_drift_maps(dataset: Dataset, *, train: str = "train", dev: str = "dev", relevance_level: int = 1,
                   corpus: np.ndarray | None = None, log=None) -> dict[str, closed_form.Map]:
    """The standard closed-form B → A maps of a drift dataset, fitted on `train` (ridge alpha on `dev`).

    paired (when the dataset has query targets or paired texts; no labels needed): mean shift, Procrustes,
    ridge; supervised: `q_B →` the grade-weighted mean of the query's relevant A documents (Procrustes,
    ridge). Mean shift and the identity are only included, and ridge only shrinks towards E, when B and A
    have the same dim; otherwise ridge shrinks towards 0.
    """
    corpus = dataset.read_corpus() if corpus is None else corpus
    train_qrels = dataset.qrels(train)
    dev_eval = SplitEvaluator(dataset, dataset.qrels(dev), ExactIndex(corpus))
    same_space = dataset.query_dim == dataset.corpus_dim
    towards, prior = ("identity", "E prior") if same_space else ("zero", "0 prior")
    maps: dict[str, closed_form.Map] = {}
    if same_space:
        maps["identity (B on A, no map)"] = closed_form.identity_map(dataset.query_dim, dataset.corpus_dim)
    if dataset.has_query_targets or dataset.num_paired:
        source, target = closed_form.paired_rows(dataset, train_qrels)
        if same_space:
            maps["paired mean shift"] = closed_form.mean_shift(source, target)
        maps["paired Procrustes"] = closed_form.orthogonal_procrustes(source, target)
        maps["paired Procrustes + shift"] = closed_form.orthogonal_procrustes(source, target, center=True)
        alpha, maps[f"paired ridge ({prior})"], _ = closed_form.choose_alpha(source, target, dev_eval,
                                                                            towards=towards)
        _log(log, f"paired ridge: alpha {alpha:.4g}")
    positions, target = closed_form.relevant_targets(train_qrels, corpus, relevance_level)
    source = dataset.read_queries(train_qrels.query_rows[positions])
    maps["supervised Procrustes"] = closed_form.orthogonal_procrustes(source, target)
    alpha, maps[f"supervised ridge ({prior})"], _ = closed_form.choose_alpha(source, target, dev_eval,
                                                                              towards=towards)
    _log(log, f"supervised ridge: alpha {alpha:.4g}")
    return maps


def drift_report(dataset: Dataset, split: str, maps: dict[str, closed_form.Map], *, corpus_b=None,
                 workdirs=(), metrics=DEFAULT_METRICS, corpus: np.ndarray | None = None) -> list[dict]:
    """Rows `{"system", <metric>..., "retention"}`: A native (with query targets), B native (with `corpus_b`,
    B's `[N, d_B]` corpus in the dataset's corpus row order), each closed-form map and each trained run's
    head applied to B's queries on A's index. `retention` (of the first metric) is None without B native."""
    corpus = dataset.read_corpus() if corpus is None else corpus
    qrels = dataset.qrels(split)
    on_A = SplitEvaluator(dataset, qrels, ExactIndex(corpus))
    rows = []
    if dataset.has_query_targets:  # A's own embeddings of the same queries, on A's index
        queries_A = dataset.table("queries/targets")[np.asarray(qrels.query_rows, np.int64)].read().result()
        rows.append(_row("A native", on_A.rank_vectors(queries_A.astype(np.float32)), metrics))
    native = None
    if corpus_b is not None:
        corpus_b = np.asarray(corpus_b, np.float32)
        if corpus_b.shape != (dataset.num_documents, dataset.query_dim):
            raise ValueError(f"B's corpus must be [{dataset.num_documents}, {dataset.query_dim}], "
                             f"got {corpus_b.shape}")
        native = _row("B native", SplitEvaluator(dataset, qrels, ExactIndex(corpus_b)).rank_vectors(
            on_A.queries), metrics)
        rows.append(native)
    for name, transform in maps.items():
        rows.append(_row(name, on_A.rank(lambda q, m=transform: closed_form.apply_map(q, m)), metrics))
    for workdir in workdirs:
        run = TrainedRun.load(workdir)
        run.check_fits(dataset)
        rows.append(_row(f"learned: {Path(workdir).name} ({_describe(run.config)})", on_A.rank(run.transform),
                         metrics))
    for row in rows:
        row["retention"] = row[metrics[0]] / native[metrics[0]] if native and native[metrics[0]] > 0 else None
    return rows


def markdown_table(rows: list[dict], metrics=DEFAULT_METRICS) -> str:
    """The report as a markdown table."""
    lines = ["| system | " + " | ".join(metrics) + " | retention |", "|---|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        retention = "—" if row["retention"] is None else f"{100 * row['retention']:.1f} %"
        lines.append(f"| {row['system']} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + f" | {retention} |")
    return "\n".join(lines)


def run(data: str, split: str = "test", *, corpus_b: str | None = None, workdirs=(), train: str = "train",
        dev: str = "dev", log=None) -> list[dict]:
    """`esep-jax drift`: fit the closed-form maps and report every system on `split`."""
    start = time.perf_counter()
    dataset = Dataset(data)
    corpus = dataset.read_corpus()
    maps = fit_drift_maps(dataset, train=train, dev=dev, corpus=corpus, log=log)
    corpus_b_values = None if corpus_b is None else np.load(corpus_b, allow_pickle=False)
    rows = drift_report(dataset, split, maps, corpus_b=corpus_b_values, workdirs=workdirs, corpus=corpus)
    _log(log, f"drift report in {time.perf_counter() - start:.1f} s")
    return rows


def _describe(config) -> str:
    loss = config.loss
    parts = [config.model.head]
    if loss.task_weight > 0:
        parts.append(f"{loss.kind} softmax")
    if loss.distill:
        parts.append(f"distill {loss.distill}" + (f" x{loss.distill_weight:g}" if loss.task_weight > 0 else ""))
    if loss.listwise_weight > 0:
        parts.append(f"listwise ({loss.listwise_queries}) x{loss.listwise_weight:g}")
    if loss.corpus_listwise_weight > 0:
        parts.append(f"corpus listwise x{loss.corpus_listwise_weight:g}")
    if config.model.init != "identity":
        parts.append(f"init {config.model.init}")
    return ", ".join(parts)


def _row(system: str, ranking, metrics) -> dict:
    return {"system": system, **{m: float(ranking.metrics[m]) for m in metrics}}


def _log(log, message: str) -> None:
    if log is not None:
        log(message)
