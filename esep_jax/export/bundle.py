"""`esep-jax export`: a training run's best head and a tuned ScaNN index, as one self-contained bundle.

The bundle (format: `esep_jax.export.format`) is written into a temporary sibling directory and renamed into
place only when complete (`esep_jax.atomic.atomic_directory`), after it has been loaded back through the
JAX-free serving path and checked:
- the numpy head equals the JAX head on held-out queries (else the export fails: a folding bug);
- the ScaNN settings reach the recall target on held-out *transformed* queries (the queries the head will
  really send: dev/test split queries through the head, or random training queries when there are none);
- the metrics recorded in the manifest include those of retrieval through the bundle itself.
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
from esep_jax.errors import InputError
from esep_jax.export import format as fmt
from esep_jax.export import scann_index

# Retrieval depth for the metrics measured through the bundle (the exact ones go to the run's eval.top_k).
BUNDLE_EVAL_DEPTH = 100
MAX_HELD_OUT_QUERIES = 4000


def fold_head(kind: str, member_params: dict, weights, input_dim: int, output_dim: int
              ) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest `head` entry, float32 tensors) of a trained head of `kind` (`config.model.head`).

    `member_params` carry a leading member axis `[E, ...]` and `weights` `[E]` (summing to 1) combine the
    members' query vectors, `f(q) = Σ_m w_m f_m(q)`. Every member is `E q + residual_m(q)` with E the rectangular
    identity, so linear-family heads fold to one matrix `W = E + Σ_m w_m D_m` (and `b = Σ_m w_m b_m`); MLP members
    with a non-zero weight are kept, stacked, with their weights.
    """
    weights = np.asarray(weights, np.float64)
    p = {name: {key: np.asarray(value, np.float64) for key, value in layer.items()}
         for name, layer in member_params.items()}
    head = {"kind": "linear", "trained_as": kind, "input_dim": input_dim, "output_dim": output_dim,
            "trained_members": int(weights.shape[0])}
    identity = np.eye(input_dim, output_dim)

    def mix(values: np.ndarray) -> np.ndarray:  # Σ_m w_m values[m], in float64 so W rounds once to float32
        return np.tensordot(weights, values, axes=1)

    if kind == "linear":
        tensors = {"W": identity + mix(p["residual"]["kernel"])}
        if "bias" in p["residual"]:
            tensors["b"] = mix(p["residual"]["bias"])
    elif kind == "lowrank":
        tensors = {"W": identity + mix(np.einsum("mir,mro->mio", p["down"]["kernel"], p["up"]["kernel"]))}
    elif kind == "mlp":
        keep = np.flatnonzero(weights > 0)  # greedy selection may give members no weight: serve only the others
        head.update(kind="mlp", members=int(keep.size), hidden_dim=int(p["hidden"]["kernel"].shape[-1]),
                    activation="gelu_tanh", base="rectangular_identity")
        tensors = {"member_weights": weights[keep], "hidden.kernel": p["hidden"]["kernel"][keep],
                   "hidden.bias": p["hidden"]["bias"][keep], "out.kernel": p["out"]["kernel"][keep]}
        if "bias" in p["out"]:
            tensors["out.bias"] = p["out"]["bias"][keep]
    else:
        raise InputError(f"cannot export a {kind!r} head (exportable: linear, lowrank, mlp)", field="model.head")
    head["combination_weights"] = weights.tolist()
    head["tensors"] = {name: list(value.shape) for name, value in tensors.items()}
    return head, {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}


def _run_data(workdir: Path, data: str | None) -> str:
    if data:
        return data
    info = workdir / "run.json"
    try:
        return json.loads(info.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError("cannot tell the run's dataset (no readable run.json with \"data\"); pass --data",
                         file=str(info)) from None


def _held_out_rows(dataset, config) -> tuple[np.ndarray, str]:
    """Query rows never trained on (every split but the training one), else random training queries."""
    splits = [s for s in dataset.splits if s != config.train.train_split]
    rows = np.unique(np.concatenate([dataset.qrels(s).query_rows for s in splits])) if splits else np.zeros(0)
    if rows.size:
        return rows.astype(np.int64), "+".join(splits)
    count = dataset.manifest["queries"]["count"]
    rows = np.random.default_rng(0).permutation(count)[:MAX_HELD_OUT_QUERIES]
    return np.sort(rows).astype(np.int64), "random training queries"


def _check_folding(transform, head: dict, tensors: dict, queries: np.ndarray) -> float:
    """Max |f_numpy(q) − f_jax(q)| on sample queries; a difference beyond float32 rounding is a bug."""
    expected = np.asarray(transform(queries))
    error = float(np.abs(fmt.apply_head(head, tensors, queries) - expected).max(initial=0.0))
    if error > 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0))):
        raise RuntimeError(f"the exported head differs from the trained one by {error:.3g}: an export bug")
    return error


def _eval_split(dataset, config) -> str:
    for split in ("test", config.train.dev_split):
        if split in dataset.splits:
            return split
    return config.train.train_split


def _bundle_metrics(searcher, dataset, split: str, relevance_level: int) -> dict:
    """Metrics of retrieval through the bundle (numpy head + ScaNN) on a split, to depth BUNDLE_EVAL_DEPTH."""
    from esep_jax.eval.metrics import DEFAULT_CUTOFFS, doc_id_ranks, mean_metrics, per_query_metrics

    qrels = dataset.qrels(split)
    depth = min(BUNDLE_EVAL_DEPTH, dataset.num_documents)
    rows, scores = searcher.search_rows(dataset.read_queries(qrels.query_rows), depth)
    cutoffs = tuple(c for c in DEFAULT_CUTOFFS if c <= depth)
    return mean_metrics(per_query_metrics(rows, scores, qrels, doc_id_ranks(dataset.ids("corpus")), cutoffs,
                                          relevance_level))


def _write_manifest(root: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    (root / fmt.MANIFEST).write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    (root / fmt.MANIFEST_CHECKSUM).write_text(f"{digest}  {fmt.MANIFEST}\n", encoding="utf-8")


def export_bundle(workdir: str | Path, out: str | Path, data: str | None = None, target_recall: float = 0.95,
                  overwrite: bool = False, strategy: str = "auto", k: int = 10, log=print) -> dict:
    """Writes the serving bundle of the run in `workdir` to `out` (atomically); returns its manifest."""
    from safetensors import SafetensorError

    from esep_jax.data.dataset import Dataset
    from esep_jax.eval.report import evaluate_split
    from esep_jax.train.loop import load_best_head, query_transform

    if not 0.0 < target_recall <= 1.0:
        raise InputError(f"must be in (0, 1], got {target_recall}", field="--target-recall")
    if strategy not in scann_index.STRATEGIES:
        raise InputError(f"must be one of {', '.join(scann_index.STRATEGIES)}", field="--index")
    if Path(out).exists() and not overwrite:  # checked again when renaming; this saves building an index first
        raise InputError("already exists (pass --overwrite to replace it)", file=str(out))
    workdir = Path(workdir)
    data = _run_data(workdir, data)
    dataset = Dataset(data)
    config, head_module, member_params, weights, best_steps = load_best_head(workdir, dataset)
    head, tensors = fold_head(config.model.head, member_params, weights, dataset.query_dim, dataset.corpus_dim)
    held_out_rows, held_out_name = _held_out_rows(dataset, config)
    held_out_raw = dataset.read_queries(held_out_rows)
    held_out = fmt.apply_head(head, tensors, held_out_raw)  # tuned on what the served head will send
    folding_error = _check_folding(query_transform(head_module, member_params, weights), head, tensors,
                                   held_out_raw[:512])

    corpus = dataset.read_corpus()
    plan = scann_index.plan_index(len(corpus), strategy, bool(dataset.manifest.get("normalized", False)))
    log(f"building a ScaNN index ({plan.strategy}) over {len(corpus):,} documents")
    searcher = scann_index.build_searcher(corpus, plan, k)
    tune_q, verify_q = scann_index.split_tune_verify(held_out, max_queries=MAX_HELD_OUT_QUERIES)
    tuned = scann_index.tune(searcher, plan, (tune_q, scann_index.exact_top_k(corpus, tune_q, k)[0]),
                             (verify_q, scann_index.exact_top_k(corpus, verify_q, k)[0]), target_recall, k)
    log(f"tuned on {held_out_name}: recall@{k} {tuned[f'recall@{k}']:.4f} at {tuned['qps']:,.0f} QPS "
        f"(leaves_to_search={tuned['leaves_to_search']}, reorder={tuned['reorder']})")

    split = _eval_split(dataset, config)
    exact = evaluate_split(data, split, workdir=str(workdir))
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input_dim": dataset.query_dim, "output_dim": dataset.corpus_dim, "metric": fmt.METRIC,
        "normalized": bool(dataset.manifest.get("normalized", False)),
        "encoder": {"name": dataset.manifest.get("encoder"), "query_prompt": dataset.manifest.get("query_prompt", ""),
                    "document_prompt": dataset.manifest.get("document_prompt", "")},
        "head": head,
        "corpus": {"count": len(corpus), "dataset": dataset.manifest.get("name"), "ids": fmt.IDS_FILE},
        "training": {"workdir": str(workdir.absolute()), "data": data, "best_step": np.asarray(best_steps).tolist(),
                     "model": dataclasses.asdict(config.model),
                     "ensemble": dataclasses.asdict(config.ensemble), "folding_max_abs_error": folding_error},
        "index": {"library": "scann", "scann_version": metadata.version("scann"), "path": fmt.INDEX_DIR,
                  **dataclasses.asdict(plan), **tuned, "k": k, "tuned_on": held_out_name},
        "eval": {"split": split, "queries": exact["queries"], "base": exact["base"], "head": exact["head"]},
        "files": {},
    }
    try:
        _write_bundle(out, overwrite, manifest, tensors, head, dataset, searcher, split, config)
    except (OSError, SafetensorError) as error:  # a full disk, a quota, a lost mount
        reason = " ".join(str(error).split())[:300]
        raise BundleWriteError(f"could not write the bundle {out}: {reason} (nothing was left behind)") from None
    return manifest


class BundleWriteError(RuntimeError):
    """Writing a bundle failed part-way (a full disk, a quota); the partial directory was removed."""


def _write_bundle(out, overwrite, manifest, tensors, head, dataset, searcher, split, config) -> None:
    """Writes, loads back and measures the bundle in a temporary directory renamed into place at the end."""
    from safetensors.numpy import save_file

    from esep_jax.serving import Searcher

    with atomic_directory(out, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by whichever user serves it
        save_file(tensors, str(tmp / fmt.HEAD_FILE), metadata={"format": "esep_jax.head", "kind": head["kind"]})
        (tmp / fmt.IDS_FILE).write_text("\n".join(dataset.ids("corpus")) + "\n", encoding="utf-8")
        (tmp / fmt.INDEX_DIR).mkdir()
        # Relative asset paths: the directory is renamed into place (and may be copied anywhere) after this.
        searcher.serialize(str(tmp / fmt.INDEX_DIR), relative_path=True)
        (tmp / fmt.HEAD_FILE).chmod(0o644)  # safetensors writes 0600
        manifest["files"] = {name: fmt.sha256_file(tmp / name) for name in fmt.bundle_files(tmp)}
        _write_manifest(tmp, manifest)
        # Load it back the way a server will, and measure retrieval through it.
        served = Searcher.load(tmp)
        manifest["eval"]["bundle"] = _bundle_metrics(served, dataset, split, config.eval.relevance_level)
        manifest["eval"]["bundle_depth"] = min(BUNDLE_EVAL_DEPTH, dataset.num_documents)
        _write_manifest(tmp, manifest)
