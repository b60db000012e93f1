"""`esep-jax eval`: the base embeddings and a run's best head evaluated side by side on one split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.config import EvalConfig
from esep_jax.data.dataset import Dataset, is_test_split
from esep_jax.evaluation.evaluator import SplitEvaluator
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.evaluation.views import documents_relevant_in, unseen_metrics
from esep_jax.heads.gate import gate_weights
from esep_jax.objectives.matryoshka import truncated_index_rows
from esep_jax.runs.trained_run import TrainedRun

HEADLINE = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def evaluate_split(data: str, split: str, workdir: str | None = None, eval_config: EvalConfig | None = None,
                   run_path: str | None = None, prefix_dims: list[int] | None = None,
                   run: TrainedRun | None = None, fuse: str | None = None, fuse_weight: float = 1.0,
                   fuse_k: float = 60.0, fuse_depth: int = 100) -> dict:
    """Metrics of the base retrieval and (with `workdir` or a loaded `run`) of the run's head on `split`.

    The top-level metrics are those of the head when one is given, else of the base; both systems are
    included under `base` and `head`. `subsets` holds the views that average over documents the head never
    saw as positives: `new_documents` (a dataset from `esep-jax new-documents`: its held-out documents) and
    `unseen_relevant` (documents never relevant in the dataset's train split). `zero_shot` says whether the
    dataset is another than the run was trained on; `gate`, the mean share of the head the queries got. With
    `run_path`, the evaluated system's run is written in TREC format. `prefix_dims` (default: a Matryoshka run's
    `loss.matryoshka_dims`) adds `prefixes`: every system against truncated indexes (`prefix_results`).
    With `fuse` (a TREC run file), `fusion` holds that run's metrics alone and fused with the evaluated system's
    run by RRF (`esep_jax.evaluation.fusion.fuse_with_run`: weight `fuse_weight`, k `fuse_k`, lists cut to
    `fuse_depth`).
    """
    dataset = Dataset(data)
    if run is None and workdir is not None:
        run = TrainedRun.load(workdir)
    head_info = None
    if run is not None:
        run.check_fits(dataset)
        eval_config = eval_config or run.config.eval
        head_info = {"workdir": str(run.workdir), "best_step": run.best_steps.tolist(), "head": run.config.model.head,
                     "members": run.members, "weights": run.weights.tolist(),
                     "gate": None if run.gate is None else run.gate.describe()}
        if prefix_dims is None:
            prefix_dims = list(run.config.loss.matryoshka_dims)
    eval_config = eval_config or EvalConfig()
    corpus = dataset.read_corpus()
    qrels = dataset.qrels(split)
    evaluator = SplitEvaluator(dataset, qrels, ExactIndex(corpus, eval_config.corpus_chunk),
                               top_k=eval_config.top_k, query_chunk=eval_config.query_chunk,
                               relevance_level=eval_config.relevance_level)
    base = evaluator.rank()
    result = {"dataset": dataset.manifest.get("name"), "split": split, "queries": qrels.num_queries,
              "base": base.metrics}
    final, head_vectors = base, None
    if run is not None:
        head_vectors = evaluator.transformed(run.transform)
        final = evaluator.rank_vectors(head_vectors)
        result.update(head=final.metrics, run=head_info,
                      zero_shot=run.info["dataset"].get("fingerprint") not in _lineage(dataset))
        if run.gate is not None:
            result["gate"] = float(gate_weights(run.gate, evaluator.queries).mean())
    result.update({name: final.metrics[name] for name in final.metrics})
    systems = {"base": base, **({"head": final} if run is not None else {})}
    subsets = {}
    new_rows = dataset.new_documents
    if new_rows is not None and is_test_split(split):
        old = np.ones(dataset.num_documents, bool)
        old[new_rows] = False
        subsets["new_documents"] = _view(systems, qrels, old, evaluator, eval_config.relevance_level)
    seen = None if split == "train" else documents_relevant_in(dataset, "train", eval_config.relevance_level)
    if seen is not None:
        subsets["unseen_relevant"] = _view(systems, qrels, seen, evaluator, eval_config.relevance_level)
    subsets = {name: entry for name, entry in subsets.items() if entry}
    if subsets:
        result["subsets"] = subsets
    if prefix_dims:
        result["prefixes"] = prefix_results(evaluator, corpus, head_vectors, prefix_dims, eval_config.corpus_chunk)
    if fuse:
        from esep_jax.evaluation.fusion import fuse_with_run

        result["fusion"] = {"with": "head" if run is not None else "base",
                            **fuse_with_run(evaluator, final, fuse, fuse_weight, fuse_k, fuse_depth)}
    if run_path:
        evaluator.write_trec_run(final, run_path, "esep_jax-head" if run is not None else "esep_jax-base")
    return result


def _lineage(dataset: Dataset) -> set:
    """The fingerprints a run on this dataset (or on the dataset it was derived from) would record."""
    derived = dataset.manifest.get("new_documents", {}).get("source_fingerprint")
    return {dataset.fingerprint} | ({derived} if derived else set())


def _view(systems: dict, qrels, seen: np.ndarray, evaluator: SplitEvaluator, relevance_level: int) -> dict:
    """{"queries", "base", "head"} of the view that counts only documents outside `seen` (empty if none)."""
    entry = {}
    for system, ranking in systems.items():
        queries, metrics = unseen_metrics(ranking, qrels, seen, relevance_level, evaluator.doc_id_rank,
                                          evaluator.cutoffs)
        if metrics is not None:
            entry.update(queries=queries, **{system: metrics})
    return entry


def evaluate_targets(datas: list[str], split: str, workdir: str | None = None, **options) -> list[dict]:
    """`evaluate_split` of one run on several datasets (the first usually its own: the others zero-shot)."""
    run = TrainedRun.load(workdir) if workdir is not None else None
    return [evaluate_split(data, split, run=run, **options) for data in datas]


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
        lines.append(f"{line}   {subset}: {entry['queries']} queries, counting only {SUBSET_MEANING[subset]}")
    if "gate" in result:
        lines.append(f"the in-domain gate gave these queries {100 * result['gate']:.1f} % of the head on average")
    if "fusion" in result:
        lines += format_fusion(result["fusion"], result[result["fusion"]["with"]], names)
    return "\n".join(lines)


def format_fusion(fusion: dict, system: dict, names=HEADLINE) -> list[str]:
    """The fused section of `format_table`: the run file alone, fused with the system, and the gain."""
    with_system = fusion["with"]
    lines = [f"fused: {with_system} + {fusion['run']} by RRF (k={fusion['k']:g}, weights 1 : {fusion['weight']:g}, "
             f"top {fusion['depth']} of each; the run holds {fusion['queries_in_run']} of these queries)",
             f"{'metric':<12}{'run':>9}{'fused':>9}{'delta':>9}   (delta: fused - {with_system})"]
    for name in names:
        if name in fusion["fused"]:
            lines.append(f"{name:<12}{fusion['run_alone'][name]:>9.4f}{fusion['fused'][name]:>9.4f}"
                         f"{fusion['fused'][name] - system[name]:>+9.4f}")
    return lines


SUBSET_MEANING = {"new_documents": "the documents held out as added after training",
                  "unseen_relevant": "relevant documents never relevant in train"}


def format_report(results: list[dict]) -> str:
    """One table over datasets and their views: in-domain, new documents, unseen, zero-shot (nDCG@10)."""
    first = results[0]
    lines = []
    if "run" in first:
        run = first["run"]
        gate = run["gate"]
        lines.append(f"run {run['workdir']}: {run['head']} head, {run['members']} member(s), best step "
                     f"{run['best_step']}, gate " + ("none" if gate is None else f"knn ({gate['anchors']} anchors)"))
    with_head = "head" in first
    lines.append(f"{'nDCG@10':<46}{'queries':>8}{'base':>9}" + (f"{'head':>9}{'delta':>9}{'gate':>7}" if with_head else ""))

    def row(label, queries, base, head=None, gate=None):
        text = f"{label:<46}{queries:>8}{base:>9.4f}"
        if head is not None:
            text += f"{head:>9.4f}{head - base:>+9.4f}" + (f"{gate:>7.3f}" if gate is not None else "")
        return text

    for result in results:
        label = f"{result['dataset']} / {result['split']}" + (" (zero-shot)" if result.get("zero_shot") else "")
        lines.append(row(label, result["queries"], result["base"]["ndcg@10"], result.get("head", {}).get("ndcg@10"),
                         result.get("gate")))
        for subset, entry in result.get("subsets", {}).items():
            lines.append(row(f"  {subset.replace('_', ' ')}", entry["queries"], entry["base"]["ndcg@10"],
                             entry.get("head", {}).get("ndcg@10")))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
