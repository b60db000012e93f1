"""`esep-jax eval`: the base embeddings and a run's best head evaluated side by side on one split."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from esep_jax.atomic import atomic_write_text
from esep_jax.config import EvalConfig
from esep_jax.data.dataset import Dataset
from esep_jax.eval.evaluate import SplitEvaluator
from esep_jax.eval.retrieval import ExactIndex

HEADLINE = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def evaluate_split(data: str, split: str, workdir: str | None = None, eval_config: EvalConfig | None = None,
                   run_path: str | None = None) -> dict:
    """Metrics of the base retrieval and (with `workdir`) of the run's best head on `split`.

    The top-level metrics are those of the head when one is given, else of the base; both systems are
    included under `base` and `head`. With `run_path`, the evaluated system's run is written in TREC format.
    """
    from esep_jax.train.loop import load_best_head  # training imports stay off the eval-only path

    dataset = Dataset(data)
    head_info = None
    if workdir is not None:
        run_config, head, params, best_step = load_best_head(workdir, dataset)
        eval_config = eval_config or run_config.eval
        apply_head = jax.jit(lambda queries: head.apply({"params": params}, queries))
        head_info = {"workdir": str(workdir), "best_step": best_step, "head": run_config.model.head}
    eval_config = eval_config or EvalConfig()
    evaluator = SplitEvaluator(dataset, dataset.qrels(split), ExactIndex(dataset.read_corpus(),
                               eval_config.corpus_chunk), top_k=eval_config.top_k,
                               query_chunk=eval_config.query_chunk, relevance_level=eval_config.relevance_level)
    base = evaluator.rank()
    result = {"dataset": dataset.manifest.get("name"), "split": split, "queries": dataset.qrels(split).num_queries,
              "base": base.metrics}
    final = base
    if head_info is not None:
        final = evaluator.rank(apply_head)
        result.update(head=final.metrics, run=head_info)
    result.update({name: final.metrics[name] for name in final.metrics})
    if run_path:
        evaluator.write_trec_run(final, run_path, "esep_jax-head" if head_info else "esep_jax-base")
    return result


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
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
