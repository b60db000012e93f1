"""`esep-jax eval`: the base embeddings and a run's best head evaluated side by side on one split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.config import EvalConfig
from esep_jax.data.dataset import Dataset
from esep_jax.evaluation.evaluator import SplitEvaluator
from esep_jax.evaluation.metrics import mean_metrics, per_query_metrics
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.evaluation.views import documents_relevant_in, unseen_relevant_view
from esep_jax.objectives.matryoshka import truncated_index_rows
from esep_jax.runs.trained_run import TrainedRun

HEADLINE = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def evaluate_split(data: str, split: str, workdir: str | None = None, eval_config: EvalConfig | None = None,
                   run_path: str | None = None, prefix_dims: list[int] | None = None) -> dict:
    """Metrics of the base retrieval and (with `workdir`) of the run's best head on `split`.

    The top-level metrics are those of the head when one is given, else of the base; both systems are
    included under `base` and `head`. With `run_path`, the evaluated system's run is written in TREC format.
    `prefix_dims` (default: a Matryoshka run's `loss.matryoshka_dims`) adds `prefixes`: every system against
    the index truncated to each prefix size (see `prefix_results`).
    """
    dataset = Dataset(data)
    head_info = None
    if workdir is not None:
        run = TrainedRun.load(workdir)
        run.check_fits(dataset)
        eval_config = eval_config or run.config.eval
        apply_head = run.transform
        head_info = {"workdir": str(workdir), "best_step": run.best_steps.tolist(), "head": run.config.model.head,
                     "members": run.members, "weights": run.weights.tolist()}
        if prefix_dims is None:
            prefix_dims = list(run.config.loss.matryoshka_dims)
    eval_config = eval_config or EvalConfig()
    corpus = dataset.read_corpus()
    evaluator = SplitEvaluator(dataset, dataset.qrels(split), ExactIndex(corpus, eval_config.corpus_chunk),
                               top_k=eval_config.top_k, query_chunk=eval_config.query_chunk,
                               relevance_level=eval_config.relevance_level)
    base = evaluator.rank()
    result = {"dataset": dataset.manifest.get("name"), "split": split, "queries": dataset.qrels(split).num_queries,
              "base": base.metrics}
    final = base
    if head_info is not None:
        head_vectors = evaluator.transformed(apply_head)
        final = evaluator.rank_vectors(head_vectors)
        result.update(head=final.metrics, run=head_info)
    result.update({name: final.metrics[name] for name in final.metrics})
    seen = None if split == "train" else documents_relevant_in(dataset, "train", eval_config.relevance_level)
    if seen is not None:
        systems = {"base": base, **({"head": final} if head_info is not None else {})}
        entry = {}
        for system, ranking in systems.items():
            rows, scores, view, keep = unseen_relevant_view(ranking, dataset.qrels(split), seen,
                                                            eval_config.relevance_level)
            if len(keep):
                entry["queries"] = len(keep)
                entry[system] = mean_metrics(per_query_metrics(rows, scores, view, evaluator.doc_id_rank,
                                                               evaluator.cutoffs, eval_config.relevance_level))
        if entry:
            result["subsets"] = {"unseen_relevant": entry}
    if prefix_dims:
        result["prefixes"] = prefix_results(evaluator, corpus, head_vectors if head_info is not None else None,
                                            prefix_dims, eval_config.corpus_chunk)
    if run_path:
        evaluator.write_trec_run(final, run_path, "esep_jax-head" if head_info else "esep_jax-base")
    return result


def prefix_results(evaluator: SplitEvaluator, corpus: np.ndarray, head_vectors: np.ndarray | None,
                   dims: list[int], corpus_chunk: int = 65536) -> dict:
    """Per prefix size k, metrics against the corpus index truncated to its first k dimensions.

    The truncated index stores each document's first k dimensions re-normalised (cosine on the prefix, the
    usual way to truncate embeddings, and what a Matryoshka head is trained against); `base` and `head` are
    scored on it with their first k query dimensions. `base_raw` keeps the raw prefixes (a plain dot product
    on the truncated rows), for reference. The full dimension is included as the reference point.
    """
    queries = evaluator.base_vectors()
    results = {}
    for k in sorted({d for d in dims if d < corpus.shape[1]} | {corpus.shape[1]}):
        truncated = ExactIndex(truncated_index_rows(corpus, k), corpus_chunk)
        entry = {"base": evaluator.rank_vectors(queries[:, :k], truncated).metrics,
                 "base_raw": evaluator.rank_vectors(queries[:, :k], ExactIndex(corpus[:, :k], corpus_chunk)).metrics}
        if head_vectors is not None:
            entry["head"] = evaluator.rank_vectors(head_vectors[:, :k], truncated).metrics
        results[str(k)] = entry
    return results


def format_table(result: dict, names=HEADLINE) -> str:
    """A plain-text table: metric, base, head and the difference."""
    with_head = "head" in result
    header = f"{'metric':<12}{'base':>9}" + (f"{'head':>9}{'delta':>9}" if with_head else "")
    lines = [f"{result['dataset']} / {result['split']} ({result['queries']} queries)", header]
    for name in names:
        if name not in result["base"]:
            continue
        line = f"{name:<12}{result['base'][name]:>9.4f}"
        if with_head:
            line += f"{result['head'][name]:>9.4f}{result['head'][name] - result['base'][name]:>+9.4f}"
        lines.append(line)
    for k, entry in result.get("prefixes", {}).items():
        line = f"{'ndcg@10':<12}{entry['base']['ndcg@10']:>9.4f}"
        if "head" in entry:
            line += f"{entry['head']['ndcg@10']:>9.4f}{entry['head']['ndcg@10'] - entry['base']['ndcg@10']:>+9.4f}"
        lines.append(f"{line}   index of the first {k} dims (raw prefixes, no re-normalising: base "
                     f"{entry['base_raw']['ndcg@10']:.4f})")
    for subset, entry in result.get("subsets", {}).items():
        line = f"{'ndcg@10':<12}{entry['base']['ndcg@10']:>9.4f}"
        if "head" in entry:
            line += f"{entry['head']['ndcg@10']:>9.4f}{entry['head']['ndcg@10'] - entry['base']['ndcg@10']:>+9.4f}"
        lines.append(f"{line}   {subset}: {entry['queries']} queries, counting only relevant documents "
                     "never relevant in train")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
