"""Query drift compensation: how much of a new encoder's quality survives on an old encoder's index.

Encoder A built the index (the dataset's corpus); encoder B is the new query encoder. Rather than re-embedding
the corpus with B, a map `f` sends B's query vectors into A's space and they are searched on A's corpus.
`retention_report` measures, on one split:

- `A native`: A's queries on A's index (what the index was built for);
- `B native`: B's queries on B's own index (`corpus_B`), the quality re-indexing would give;
- one row per map: B's queries through `f`, searched on A's index;

with `retention = metric ÷ B-native metric` (Drift-Adapter's measure). `fit_drift_maps` fits the standard
closed-form maps (`esep_jax.closed_form`) and `python -m esep_jax.drift` runs the whole comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from esep_jax import closed_form
from esep_jax.data.dataset import Dataset
from esep_jax.eval.evaluate import SplitEvaluator
from esep_jax.eval.retrieval import ExactIndex

DEFAULT_METRICS = ("ndcg@10", "recall@100")


def evaluator_with_queries(dataset: Dataset, split: str, queries, index: ExactIndex | None = None,
                           **kwargs) -> SplitEvaluator:
    """A `SplitEvaluator` of `split` whose queries are rows of `queries` (a `[Q, d]` table in the dataset's
    query row order, e.g. encoder B's vectors) instead of the dataset's own; `index` defaults to A's corpus."""
    index = ExactIndex(dataset.read_corpus()) if index is None else index
    evaluator = SplitEvaluator(dataset, dataset.qrels(split), index, **kwargs)
    evaluator.queries = np.asarray(queries, np.float32)[evaluator.qrels.query_rows]
    return evaluator


def retention_report(dataset_A: Dataset, queries_B, split: str, maps: dict[str, closed_form.Map],
                     corpus_B=None, *, metrics=DEFAULT_METRICS) -> list[dict]:
    """Rows `{"system", <metric>..., "retention"}` for A native, B native (when `corpus_B`, B's `[N, d_B]`
    corpus in A's corpus row order, is given) and each named map `(W, b)` applied to B's queries and searched
    on A's corpus. `queries_B` is `[Q, d_B]` in A's query row order. `retention` (of the first metric) is
    `None` without `corpus_B`."""
    queries_B = np.asarray(queries_B, np.float32)
    if queries_B.shape[0] != len(dataset_A.ids("queries")):
        raise ValueError(f"queries_B has {queries_B.shape[0]} rows, the dataset {len(dataset_A.ids('queries'))}")
    index_A = ExactIndex(dataset_A.read_corpus())
    on_A = evaluator_with_queries(dataset_A, split, queries_B, index_A)
    rows = [_row("A native", SplitEvaluator(dataset_A, dataset_A.qrels(split), index_A).rank(), metrics)]
    native = None
    if corpus_B is not None:
        corpus_B = np.asarray(corpus_B, np.float32)
        if corpus_B.shape != (dataset_A.num_documents, queries_B.shape[1]):
            raise ValueError(f"corpus_B must be [{dataset_A.num_documents}, {queries_B.shape[1]}], "
                             f"got {corpus_B.shape}")
        native = _row("B native", evaluator_with_queries(dataset_A, split, queries_B, ExactIndex(corpus_B)).rank(),
                      metrics)
        rows.append(native)
    for name, transform in maps.items():
        rows.append(_row(name, on_A.rank(lambda q, m=transform: closed_form.apply_map(q, m)), metrics))
    for row in rows:
        row["retention"] = row[metrics[0]] / native[metrics[0]] if native and native[metrics[0]] > 0 else None
    return rows


def fit_drift_maps(dataset_A: Dataset, queries_B, *, train: str = "train", dev: str = "dev",
                   relevance_level: int = 1, log=None) -> dict[str, closed_form.Map]:
    """The standard closed-form B → A maps, fitted on `train` (ridge alpha chosen on `dev` by nDCG@10).

    paired: `q_B → q_A` of the same train queries (no labels needed: mean shift, Procrustes, ridge towards E);
    supervised: `q_B →` the grade-weighted mean of the query's relevant A documents (Procrustes, ridge).
    Mean shift and the identity are only included, and ridge only shrinks towards E, when B and A have the same
    dim; otherwise ridge shrinks towards 0.
    """
    queries_B = np.asarray(queries_B, np.float32)
    rows = dataset_A.qrels(train).query_rows
    source, target = queries_B[rows], dataset_A.read_queries(rows)
    corpus_A = dataset_A.read_corpus()
    dev_eval = evaluator_with_queries(dataset_A, dev, queries_B, ExactIndex(corpus_A))
    maps: dict[str, closed_form.Map] = {}
    # E is only a sensible prior when B's coordinates are A's (same dim, related models); else shrink to 0.
    same_space = source.shape[1] == target.shape[1]
    towards, prior = ("identity", "E prior") if same_space else ("zero", "0 prior")
    if same_space:
        maps["identity (B on A, no map)"] = closed_form.identity_map(source.shape[1], target.shape[1])
        maps["paired mean shift"] = closed_form.mean_shift(source, target)
    maps["paired Procrustes"] = closed_form.orthogonal_procrustes(source, target)
    maps["paired Procrustes + shift"] = closed_form.orthogonal_procrustes(source, target, center=True)
    alpha, maps[f"paired ridge ({prior})"], _ = closed_form.choose_alpha(source, target, dev_eval, towards=towards)
    _log(log, f"paired ridge: alpha {alpha:.4g}")
    sup_source, sup_target = closed_form.supervised_targets(dataset_A, train, relevance_level, queries=queries_B,
                                                            corpus=corpus_A)
    maps["supervised Procrustes"] = closed_form.orthogonal_procrustes(sup_source, sup_target)
    alpha, maps[f"supervised ridge ({prior})"], _ = closed_form.choose_alpha(sup_source, sup_target, dev_eval,
                                                                              towards=towards)
    _log(log, f"supervised ridge: alpha {alpha:.4g}")
    return maps


def markdown_table(rows: list[dict], metrics=DEFAULT_METRICS) -> str:
    """The report as a markdown table."""
    lines = ["| system | " + " | ".join(metrics) + " | retention |", "|---|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        retention = "—" if row["retention"] is None else f"{100 * row['retention']:.1f} %"
        lines.append(f"| {row['system']} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + f" | {retention} |")
    return "\n".join(lines)


def _row(system: str, ranking, metrics) -> dict:
    return {"system": system, **{m: float(ranking.metrics[m]) for m in metrics}}


def _log(log, message: str) -> None:
    if log is not None:
        log(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esep_jax.drift",
        description="Retention of closed-form B→A query maps on an A dataset (see tools/build_drift_data.py).")
    parser.add_argument("--data", required=True, help="the A dataset (esep-jax ingest output)")
    parser.add_argument("--queries-b", required=True, help="B's query vectors .npy, in A's query row order")
    parser.add_argument("--corpus-b", help="B's corpus vectors .npy, in A's corpus row order (for B native)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train", default="train")
    parser.add_argument("--dev", default="dev")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dataset = Dataset(args.data)
    queries_B = np.load(args.queries_b, allow_pickle=False).astype(np.float32)
    corpus_B = None if args.corpus_b is None else np.load(args.corpus_b, allow_pickle=False).astype(np.float32)
    maps = fit_drift_maps(dataset, queries_B, train=args.train, dev=args.dev,
                          log=lambda m: print(m, file=sys.stderr))
    rows = retention_report(dataset, queries_B, args.split, maps, corpus_B)
    print(markdown_table(rows))
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
