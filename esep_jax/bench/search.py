"""`esep-jax bench search`: ScaNN as exported in bundles, against exact brute-force search.

Reports, for one corpus: the index the export would build (same size rules, same tuner), its recall@10 against
exact top-10 and its QPS at the tuned settings, the QPS of exact search written the plain fast way (a BLAS
matmul + argpartition, batched over queries and corpus chunks, on all cores), and the build and tuning times.
Queries are split in halves: settings are tuned on one and recall/QPS measured on the other.

Synthetic data is clustered (`synthetic_embeddings`): unit vectors from a hierarchical Gaussian mixture. Uniform
noise on the sphere would be unrealistically hard (every point nearly equidistant from every other, which no
real embedding space looks like) and would make any approximate index look bad.
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


def synthetic_embeddings(num_docs: int, num_queries: int, dim: int, seed: int = 0, noise: float = 2.0,
                         branching: int = 4, docs_per_cluster: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised float32 (corpus `[N, d]`, queries `[Q, d]`): a hierarchical Gaussian mixture.

    Cluster centres form a tree: each level splits every centre into `branching` children by adding a Gaussian
    offset, down to ~N/25 clusters (L = ⌈log_b(N/25)⌉ levels, offsets of norm 1/√L so centres have norm ≈ 1).
    A point is its cluster's centre plus Gaussian noise of norm ≈ `noise`, normalised; queries are drawn the
    same way. Neighbourhoods are thus nested at every scale, as in real embedding spaces, and no partition of the
    index lines up with them exactly. With the defaults, a √N-leaf tree needs ~3-5 % of its leaves for
    recall@10 ≈ 0.95 at 100k points, the range reported for real corpora. (One flat level of ~N/25 clusters
    instead defeats k-means partitioning much as uniform noise does; a tree whose levels line up with the
    index's leaves makes the index look better than it is.) Generated in blocks: no float64 temporaries.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(dim)  # a standard normal vector times this has norm ≈ 1
    num_clusters = max(2, num_docs // docs_per_cluster)
    levels = max(1, math.ceil(math.log(num_clusters) / math.log(branching)))
    centres = np.zeros((1, dim), np.float32)
    for _ in range(levels):
        count = min(num_clusters, len(centres) * branching)
        centres = centres[np.arange(count) % len(centres)]
        centres += (scale / math.sqrt(levels)) * rng.standard_normal((count, dim), dtype=np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 65_536):
            n = min(65_536, count - start)
            block = centres[rng.integers(0, len(centres), n)]
            block += (noise * scale) * rng.standard_normal((n, dim), dtype=np.float32)
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
