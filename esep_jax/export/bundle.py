"""`esep-jax export`: a training run's best head and a tuned ScaNN index, as one self-contained bundle.

The bundle (format: `esep_jax.export.format`) is written into a temporary sibling directory and renamed into
place only when complete (`esep_jax.atomic.atomic_directory`), after it has been loaded back through the
JAX-free serving path and checked:
- the numpy head equals the JAX head on held-out queries (else the export fails: a folding bug);
- the ScaNN settings reach the recall target on *transformed* queries (the queries the head will really
  send: dev queries through the head, topped up with training queries) — never on test queries, which export
  does not read;
- the metrics recorded in the manifest (on dev) include those of retrieval through the bundle itself.

With `corpus_text` (a BEIR corpus.jsonl holding exactly the dataset's corpus ids) the bundle also stores each
document's title and text (`esep_jax.serving.documents`), and with `bm25` a BM25 index over them for hybrid
search (`esep_jax.serving.hybrid`); both are checked and checksummed like the rest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_directory
from esep_jax.data import dataset as dataset_module
from esep_jax.errors import InputError, StorageError, os_reason
from esep_jax.export import format as fmt
from esep_jax.export import scann_index

# Retrieval depth for the metrics measured through the bundle (the exact ones go to the run's eval.top_k).
BUNDLE_EVAL_DEPTH = 100
MAX_HELD_OUT_QUERIES = 4000
MIN_TUNING_QUERIES = 200


def fold_head(kind: str, member_params: dict, weights, input_dim: int, output_dim: int
              ) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest `head` entry, float32 tensors) of a trained head of `kind` (`config.model.head`), folded by
    the head's own registered `fold` (members `[E, ...]` combined with `weights` `[E]`, summing to 1)."""
    from esep_jax.heads import head_spec

    try:
        spec = head_spec(kind)
    except ValueError as error:
        raise InputError(str(error), field="model.head") from None
    weights = np.asarray(weights, np.float64)
    head, tensors = spec.fold(member_params, weights, input_dim, output_dim)
    if head.get("kind") not in fmt.HEAD_KINDS:
        raise RuntimeError(f"head {kind!r} folds into bundle kind {head.get('kind')!r}, which bundles do not serve")
    head = {**head, "trained_as": kind, "input_dim": input_dim, "output_dim": output_dim,
            "trained_members": int(weights.shape[0]), "combination_weights": weights.tolist(),
            "tensors": {name: list(np.shape(value)) for name, value in tensors.items()}}
    return head, {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}


def _tuning_rows(dataset, config) -> tuple[np.ndarray, str]:
    """Query rows to tune ScaNN on: never a test query. The dev split's queries, topped up with training
    queries when there are fewer than `MIN_TUNING_QUERIES` (the index is tuned for queries like these)."""
    test_rows = set()
    for split in dataset.splits:
        if dataset_module.is_test_split(split):
            test_rows.update(dataset.qrels(split).query_rows.tolist())
    parts, names = [], []
    if config.train.dev_split in dataset.splits:
        parts.append(dataset.qrels(config.train.dev_split).query_rows)
        names.append(config.train.dev_split)
    if sum(len(p) for p in parts) < MIN_TUNING_QUERIES and config.train.train_split in dataset.splits:
        train_rows = dataset.qrels(config.train.train_split).query_rows
        parts.append(np.random.default_rng(0).permutation(train_rows)[:MAX_HELD_OUT_QUERIES])
        names.append(f"{config.train.train_split} (sample)")
    rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    rows = np.array([r for r in rows.tolist() if r not in test_rows], np.int64)
    if not rows.size:
        raise InputError("no non-test queries to tune the index on (export never reads test queries)",
                         file=dataset.location, field="splits")
    return rows, "+".join(names)


def _check_folding(transform, head: dict, tensors: dict, queries: np.ndarray) -> float:
    """Max |f_numpy(q) − f_jax(q)| on sample queries; a difference beyond float32 rounding is a bug."""
    expected = np.asarray(transform(queries))
    error = float(np.abs(fmt.apply_head(head, tensors, queries) - expected).max(initial=0.0))
    if error > 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0))):
        raise RuntimeError(f"the exported head differs from the trained one by {error:.3g}: an export bug")
    return error


def _eval_split(dataset, config) -> str | None:
    """The split whose metrics the manifest records: dev (never test), else none."""
    return config.train.dev_split if config.train.dev_split in dataset.splits else None


def _bundle_metrics(searcher, dataset, split: str, relevance_level: int) -> dict:
    """Metrics of retrieval through the bundle (numpy head + ScaNN) on a split, to depth BUNDLE_EVAL_DEPTH."""
    from esep_jax.evaluation.metrics import DEFAULT_CUTOFFS, doc_id_ranks, mean_metrics, per_query_metrics

    qrels = dataset.qrels(split)
    depth = min(BUNDLE_EVAL_DEPTH, dataset.num_documents)
    rows, scores = searcher.search_rows(dataset.read_queries(qrels.query_rows), depth)
    cutoffs = tuple(c for c in DEFAULT_CUTOFFS if c <= depth)
    return mean_metrics(per_query_metrics(rows, scores, qrels, doc_id_ranks(dataset.ids("corpus")), cutoffs,
                                          relevance_level))


@dataclasses.dataclass
class CorpusText:
    """The documents of `--corpus-text`, in the dataset's corpus row order."""

    source: str
    titles: list[str]
    texts: list[str]


def read_corpus_text(path: str, corpus_ids: list[str]) -> CorpusText:
    """Titles and texts of a BEIR corpus file that must hold exactly the dataset's corpus ids (any order);
    otherwise one InputError naming the file (and the line of an id the dataset does not have)."""
    from esep_jax.data.beir import read_beir_documents

    documents = read_beir_documents(path)
    row_of = {doc_id: row for row, doc_id in enumerate(corpus_ids)}
    for doc_id, line in zip(documents.ids, documents.lines):
        if doc_id not in row_of:
            raise InputError(f"id {doc_id!r} is not a corpus id of the dataset (the texts must be those of the "
                             "dataset's documents, with the same ids)", file=path, line=line, field="_id")
    if len(documents.ids) != len(corpus_ids):  # no unknown ids and no duplicates: some are missing
        present = set(documents.ids)
        missing = [doc_id for doc_id in corpus_ids if doc_id not in present]
        raise InputError(f"{len(missing)} of the dataset's {len(corpus_ids)} corpus ids have no text here "
                         f"(first: {missing[0]!r})", file=path)
    order = np.empty(len(corpus_ids), np.int64)
    order[[row_of[doc_id] for doc_id in documents.ids]] = np.arange(len(corpus_ids))
    return CorpusText(Path(path).name, [documents.titles[i] for i in order], [documents.texts[i] for i in order])


def _write_manifest(root: Path, manifest: dict, key: bytes | None) -> None:
    data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    (root / fmt.MANIFEST).write_bytes(data)
    (root / fmt.MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(data).hexdigest()}  {fmt.MANIFEST}\n", encoding="utf-8")
    if key is not None:
        (root / fmt.MANIFEST_SIGNATURE).write_text(fmt.manifest_signature(data, key) + "\n", encoding="utf-8")


def export_bundle(workdir: str | Path, out: str | Path, data: str | None = None, target_recall: float = 0.95,
                  overwrite: bool = False, strategy: str = "auto", k: int = 10, log=print,
                  key: bytes | None = None, allow_harmful: bool = False, corpus_text: str | None = None,
                  bm25: bool = False) -> dict:
    """Writes the serving bundle of the run in `workdir` to `out` (atomically); returns its manifest.

    The run is loaded once, read-only (`TrainedRun`); the corpus is read once; test queries are never read.
    With `key`, the manifest is signed (`manifest.json.hmac`; see `esep_jax.serving.searcher`). A run flagged
    harmful by training (worse than the base on its new-documents dev view) is refused unless `allow_harmful`.
    `corpus_text` (BEIR jsonl) adds the document store, and `bm25` a BM25 index over the same texts.
    """
    from safetensors import SafetensorError

    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.evaluator import SplitEvaluator
    from esep_jax.evaluation.retrieval import ExactIndex
    from esep_jax.runs.trained_run import TrainedRun

    if not 0.0 < target_recall <= 1.0:
        raise InputError(f"must be in (0, 1], got {target_recall}", field="--target-recall")
    if strategy not in scann_index.STRATEGIES:
        raise InputError(f"must be one of {', '.join(scann_index.STRATEGIES)}", field="--index")
    if bm25 and not corpus_text:
        raise InputError("needs --corpus-text (the documents' texts to index)", field="--bm25")
    if Path(out).exists() and not overwrite:  # checked again when renaming; this saves building an index first
        raise InputError("already exists (pass --overwrite to replace it)", file=str(out))
    run = TrainedRun.load(workdir)
    data = data or run.info["data"]
    dataset = Dataset(data)
    run.check_fits(dataset)
    config = run.config
    # Read and matched to the corpus before anything is built: a wrong file fails in seconds, leaving nothing.
    text = read_corpus_text(corpus_text, dataset.ids("corpus")) if corpus_text else None
    if run.summary and run.summary.get("harmful") and not allow_harmful:
        views = run.summary["best_dev"]["new_documents"], run.summary["base_dev"]["new_documents"]
        raise InputError(f"the run's head is worse than the base embeddings on its new-documents dev view (nDCG@10 "
                         f"{views[0]['ndcg@10']:.4f} vs {views[1]['ndcg@10']:.4f}): it would push down documents "
                         "added after training; pass --allow-harmful-head to export it anyway", file=str(workdir))
    head, tensors = fold_head(config.model.head, run.params, run.weights, dataset.query_dim, dataset.corpus_dim)
    if run.gate is not None:
        head["gate"] = run.gate.describe()
        tensors["gate.anchors"] = np.ascontiguousarray(run.gate.anchors, np.float32)
        head["tensors"]["gate.anchors"] = list(run.gate.anchors.shape)
    tuning_rows, tuning_name = _tuning_rows(dataset, config)
    tuning_raw = dataset.read_queries(tuning_rows)
    tuning = fmt.apply_head(head, tensors, tuning_raw)  # tuned on what the served head will send
    folding_error = _check_folding(run.transform, head, tensors, tuning_raw[:512])

    corpus = dataset.read_corpus()
    plan = scann_index.plan_index(len(corpus), strategy, bool(dataset.manifest.get("normalized", False)))
    log(f"building a ScaNN index ({plan.strategy}) over {len(corpus):,} documents")
    searcher = scann_index.build_searcher(corpus, plan, k)
    tune_q, verify_q = scann_index.split_tune_verify(tuning, max_queries=MAX_HELD_OUT_QUERIES)
    tuned = scann_index.tune(searcher, plan, (tune_q, scann_index.exact_top_k(corpus, tune_q, k)[0]),
                             (verify_q, scann_index.exact_top_k(corpus, verify_q, k)[0]), target_recall, k)
    log(f"tuned on {tuning_name}: recall@{k} {tuned[f'recall@{k}']:.4f} at {tuned['qps']:,.0f} QPS "
        f"(leaves_to_search={tuned['leaves_to_search']}, reorder={tuned['reorder']})")

    split = _eval_split(dataset, config)
    evaluation = None
    if split is not None:
        evaluator = SplitEvaluator(dataset, dataset.qrels(split), ExactIndex(corpus, config.eval.corpus_chunk),
                                   top_k=config.eval.top_k, relevance_level=config.eval.relevance_level)
        evaluation = {"split": split, "queries": evaluator.qrels.num_queries, "base": evaluator.rank().metrics,
                      "head": evaluator.rank(run.transform).metrics}
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input_dim": dataset.query_dim, "output_dim": dataset.corpus_dim, "metric": fmt.METRIC,
        "normalized": bool(dataset.manifest.get("normalized", False)),
        "encoder": {"name": dataset.manifest.get("encoder"), "query_prompt": dataset.manifest.get("query_prompt", ""),
                    "document_prompt": dataset.manifest.get("document_prompt", "")},
        "head": head,
        "corpus": {"count": len(corpus), "dataset": dataset.manifest.get("name"), "ids": fmt.IDS_FILE},
        "training": {"workdir": str(Path(workdir).absolute()), "data": data, "best_step": run.best_steps.tolist(),
                     "model": dataclasses.asdict(config.model), "ensemble": _json_ready(config.ensemble),
                     "folding_max_abs_error": folding_error,
                     # The head against the identity on every dev view, as training measured them.
                     "dev": None if run.summary is None else {
                         "base": run.summary["base_dev"], "head": run.summary["best_dev"],
                         "harmful": run.summary.get("harmful", False)}},
        "index": {"library": "scann", "scann_version": metadata.version("scann"), "path": fmt.INDEX_DIR,
                  **dataclasses.asdict(plan), **tuned, "k": k, "tuned_on": tuning_name},
        "eval": evaluation,
        "files": {},
    }
    try:
        _write_bundle(out, overwrite, manifest, tensors, head, dataset, searcher, split, config, key, text, bm25,
                      log)
    except (OSError, SafetensorError, RuntimeError) as error:  # a full disk, a quota, a lost mount, ScaNN's writer
        reason = os_reason(error)
        raise BundleWriteError(f"could not write the bundle {out}: {reason} (nothing was left behind)") from None
    return manifest


def _json_ready(section) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(section)))


class BundleWriteError(StorageError):
    """Writing a bundle failed part-way (a full disk, a quota); the partial directory was removed."""


def _write_bundle(out, overwrite, manifest, tensors, head, dataset, searcher, split, config, key, text, bm25,
                  log) -> None:
    """Writes, loads back and measures the bundle in a temporary directory renamed into place at the end."""
    from safetensors.numpy import save_file

    from esep_jax.serving import Searcher
    from esep_jax.serving.documents import write_documents
    from esep_jax.serving.hybrid import write_bm25_index

    with atomic_directory(out, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by whichever user serves it
        save_file(tensors, str(tmp / fmt.HEAD_FILE), metadata={"format": "esep_jax.head", "kind": head["kind"]})
        (tmp / fmt.IDS_FILE).write_text("\n".join(dataset.ids("corpus")) + "\n", encoding="utf-8")
        (tmp / fmt.INDEX_DIR).mkdir()
        # Relative asset paths: the directory is renamed into place (and may be copied anywhere) after this.
        searcher.serialize(str(tmp / fmt.INDEX_DIR), relative_path=True)
        if text is not None:
            manifest["documents"] = write_documents(tmp, dataset.ids("corpus"), text.titles, text.texts, text.source)
        if bm25:
            log(f"building a BM25 index over {len(text.texts):,} documents")
            # Title + text, as the dense side encodes BEIR documents (`read_beir_corpus`).
            manifest["bm25"] = write_bm25_index(tmp, [(title + " " + body).strip()
                                                      for title, body in zip(text.titles, text.texts)])
        (tmp / fmt.HEAD_FILE).chmod(0o644)  # safetensors writes 0600
        manifest["files"] = {name: fmt.sha256_file(tmp / name) for name in fmt.bundle_files(tmp)}
        _write_manifest(tmp, manifest, key)
        # Load it back the way a server will, and measure retrieval through it.
        if split is not None:
            served = Searcher.load(tmp, key=key)
            manifest["eval"]["bundle"] = _bundle_metrics(served, dataset, split, config.eval.relevance_level)
            manifest["eval"]["bundle_depth"] = min(BUNDLE_EVAL_DEPTH, dataset.num_documents)
            _write_manifest(tmp, manifest, key)
