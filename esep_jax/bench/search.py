"""`esep-jax bench search`: ScaNN as exported in bundles, against exact brute-force search.

Reports, for one corpus: the index the export would build (same size rules, same tuner), its recall@10 against
exact top-10 and its QPS at the tuned settings, the QPS of exact search written the plain fast way (a BLAS
matmul + argpartition, batched over queries and corpus chunks, on all cores), and the build and tuning times.
Queries are split in halves: settings are tuned on one and recall/QPS measured on the other.

Synthetic data is clustered: documents and queries are unit vectors scattered around ~√N random centres.
Uniform noise on the sphere would be unrealistically hard (every point is nearly equidistant from every other,
which no real embedding space looks like), and would make any approximate index look bad.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.export import scann_index

COLUMNS = [("data", "data"), ("corpus_size", "N"), ("dim", "d"), ("strategy", "index"), ("num_leaves", "leaves"),
           ("leaves_to_search", "searched"), ("reorder", "reorder"), ("recall@10", "recall@10"), ("qps", "QPS"),
           ("brute_force_qps", "brute-force QPS"), ("speedup", "speed-up"), ("build_s", "build s")]


def synthetic_embeddings(num_docs: int, num_queries: int, dim: int, seed: int = 0, spread: float = 1.0,
                         num_clusters: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised float32 (corpus `[N, d]`, queries `[Q, d]`).

    Each point is a random centre plus Gaussian noise of norm ≈ `spread` (the centres have norm 1), normalised;
    queries are drawn the same way around the same centres. Generated in blocks to bound memory at 1M+ rows.
    """
    rng = np.random.default_rng(seed)
    num_clusters = num_clusters or max(8, int(round(math.sqrt(num_docs))))
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 65_536):
            n = min(65_536, count - start)
            block = centres[rng.integers(0, num_clusters, n)]
            block += (spread / math.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
            out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    return draw(num_docs), draw(num_queries)


def dataset_embeddings(data: str, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """(corpus, up to `num_queries` random queries, normalised flag) of an esep-jax dataset (base embeddings)."""
    from esep_jax.data.dataset import Dataset

    dataset = Dataset(data)
    rows = np.random.default_rng(seed).permutation(dataset.manifest["queries"]["count"])[:num_queries]
    return (dataset.read_corpus(), dataset.read_queries(np.sort(rows)),
            bool(dataset.manifest.get("normalized", False)))


def run_search_benchmark(corpus: np.ndarray, queries: np.ndarray, *, normalized: bool = True,
                         target_recall: float = 0.95, k: int = 10, strategy: str = "auto",
                         data: str = "synthetic", log=print) -> dict:
    """Builds, tunes and measures the ScaNN index on `corpus`, and brute force on the same queries."""
    tune_q, verify_q = scann_index.split_tune_verify(queries)
    log(f"exact top-{k} of {len(queries)} queries over {len(corpus):,} x {corpus.shape[1]} (brute force)")
    start = time.perf_counter()
    verify_truth, _ = scann_index.exact_top_k(corpus, verify_q, k)
    # One timed pass (it also produces the truth); at 1M documents a pass is many seconds, so noise is small.
    brute_force_qps = len(verify_q) / (time.perf_counter() - start)
    tune_truth, _ = scann_index.exact_top_k(corpus, tune_q, k)

    plan = scann_index.plan_index(len(corpus), strategy, normalized)
    log(f"building ScaNN ({plan.strategy}{f', {plan.num_leaves} leaves' if plan.num_leaves else ''})")
    start = time.perf_counter()
    searcher = scann_index.build_searcher(corpus, plan, k)
    build_s = time.perf_counter() - start
    log(f"built in {build_s:.1f} s; tuning for recall@{k} >= {target_recall}")
    start = time.perf_counter()
    tuned = scann_index.tune(searcher, plan, (tune_q, tune_truth), (verify_q, verify_truth), target_recall, k)
    tune_s = time.perf_counter() - start
    return {
        "data": data, "corpus_size": int(len(corpus)), "dim": int(corpus.shape[1]), "queries": int(len(queries)),
        "k": k, "strategy": plan.strategy, "num_leaves": plan.num_leaves,
        "training_sample_size": plan.training_sample_size,
        "leaves_to_search": tuned["leaves_to_search"], "reorder": tuned["reorder"],
        f"recall@{k}": tuned[f"recall@{k}"], "qps": tuned["qps"], "brute_force_qps": brute_force_qps,
        "speedup": tuned["qps"] / brute_force_qps, "target_recall": target_recall,
        "reached_target": tuned["reached_target"], "build_s": build_s, "tune_s": tune_s,
        "tune_queries": tuned["tune_queries"], "verify_queries": tuned["verify_queries"],
        "machine": {"cpus": scann_index._cpu_count(), "platform": platform.platform()},
    }


def markdown_table(records: list[dict]) -> str:
    """One row per benchmark record."""
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}" if value < 10 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(record: dict, json_path: str | None, markdown_path: str | None) -> None:
    """The record as JSON and/or a one-row markdown table, each written atomically."""
    for path, text in ((json_path, json.dumps(record, indent=2) + "\n"), (markdown_path, markdown_table([record]))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
