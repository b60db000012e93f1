"""Building a ScaNN index over a corpus and tuning it to a recall target; exact search as the yardstick.

Numpy and scann only (no JAX): serving and `esep-jax bench search` use the same search function as the tuner, so
the recall and QPS recorded at export are those of the code that serves.

The index follows ScaNN's rules of thumb (docs/algorithms.md) by corpus size:
- under ~20k documents, brute force (exact, nothing to tune);
- under ~100k, asymmetric hashing (AH, 2 dims per block) + exact reordering of the best `reorder` candidates;
- above, a k-means tree with ~√N leaves in front of AH + reorder; `leaves_to_search` leaves are scored per query.
`leaves_to_search` and `reorder` are search-time parameters, so the index is built once and `tune` picks the
fastest pair whose recall@k against exact search reaches the target on held-out queries.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

BRUTE_FORCE_MAX_DOCS = 20_000
AH_MAX_DOCS = 100_000
STRATEGIES = ("auto", "brute_force", "ah", "tree")
# Fractions of the tree's leaves tried per query, and AH candidates re-scored exactly (both ascending = cheaper).
LEAF_FRACTIONS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0)
REORDER_STEPS = (10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000)


@dataclasses.dataclass
class IndexPlan:
    """How the index is built (everything ScaNN needs at build time); recorded in the bundle manifest."""

    strategy: str  # brute_force | ah | tree
    num_docs: int
    num_leaves: int | None = None
    training_sample_size: int | None = None
    spherical: bool = False  # k-means on the unit sphere: right for normalised embeddings
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2


def plan_index(num_docs: int, strategy: str = "auto", normalized: bool = True) -> IndexPlan:
    """The index for a corpus of `num_docs` documents (`strategy="auto"` applies the size rules)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown index strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    if strategy == "auto":
        strategy = ("brute_force" if num_docs < BRUTE_FORCE_MAX_DOCS else
                    "ah" if num_docs < AH_MAX_DOCS else "tree")
    plan = IndexPlan(strategy, num_docs, spherical=normalized)
    if strategy == "tree":
        # ~√N leaves, but at least 2 and with ≥ ~50 points each so k-means has something to split.
        plan.num_leaves = int(max(2, min(round(math.sqrt(num_docs)), num_docs // 50)))
        # k-means on a sample: 250k points train 1000 leaves well and keep the build bounded at 1M+ docs.
        plan.training_sample_size = int(min(num_docs, max(250_000, 100 * plan.num_leaves)))
    return plan


def scann_ops():
    """ScaNN's pybind module wrapper (`scann.scann_ops_pybind`), or an ImportError saying how to get it."""
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as error:
        raise ImportError(f"ScaNN is needed for bundles: pip install 'scann>=1.4' (wheels for Linux x86-64 "
                          f"only) ({error})") from error
    return scann_ops_pybind


def build_searcher(corpus: np.ndarray, plan: IndexPlan, k: int = 10):
    """A ScaNN searcher for `corpus` (float32 `[N, d]`, dot product) as `plan` says."""
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    # Training threads default to one; k-means and AH training dominate the build, so use every core.
    builder = scann_ops().builder(corpus, k, "dot_product").set_n_training_threads(_cpu_count())
    if plan.strategy == "brute_force":
        return builder.score_brute_force().build()
    if plan.strategy == "tree":
        builder = builder.tree(plan.num_leaves, max(1, plan.num_leaves // 20),
                               training_sample_size=plan.training_sample_size, spherical=plan.spherical)
    builder = builder.score_ah(plan.dims_per_block,
                               anisotropic_quantization_threshold=plan.anisotropic_quantization_threshold,
                               training_sample_size=min(plan.num_docs, 100_000))
    return builder.reorder(min(plan.num_docs, 100)).build()


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def search(searcher, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
           reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows (int64, -1 where missing) and scores (float32, -inf where missing).

    A tree search that visits too few leaves returns fewer than k neighbours, which ScaNN pads with row 0 and
    a NaN score; those are turned into -1 / -inf here so padding can never pass for document 0.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    # ScaNN wants pre_reorder >= final; None means "the searcher's own default".
    pre_reorder = None if reorder is None else max(int(reorder), k)
    rows, scores = searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                    pre_reorder_num_neighbors=pre_reorder,
                                                    leaves_to_search=leaves_to_search)
    rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
    # Pad to k columns too: ScaNN may return a narrower array when every query came up short.
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
    padded = ~np.isfinite(scores) | (rows < 0) | (rows >= searcher.size())
    return np.where(padded, -1, rows), np.where(padded, -np.inf, scores).astype(np.float32)


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int, query_batch: int = 256,
                corpus_chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product: BLAS matmul + argpartition, batched over queries and corpus.

    Memory stays O(query_batch · corpus_chunk); this is the `brute_force_qps` baseline of the benchmark.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_docs = corpus.shape[0]
    k = min(k, num_docs)
    all_rows = np.empty((queries.shape[0], k), np.int64)
    all_scores = np.empty((queries.shape[0], k), np.float32)
    for q0 in range(0, queries.shape[0], query_batch):
        batch = queries[q0:q0 + query_batch]
        best_rows = np.zeros((batch.shape[0], 0), np.int64)
        best_scores = np.zeros((batch.shape[0], 0), np.float32)
        for c0 in range(0, num_docs, corpus_chunk):
            scores = batch @ corpus[c0:c0 + corpus_chunk].T
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            best_rows = np.concatenate([best_rows, part + c0], axis=1)
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
            if best_rows.shape[1] > k:  # keep only the running top-k
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        all_rows[q0:q0 + len(batch)] = np.take_along_axis(best_rows, order, axis=1)
        all_scores[q0:q0 + len(batch)] = np.take_along_axis(best_scores, order, axis=1)
    return all_rows, all_scores


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k (missing results, -1, never match)."""
    a, e = approx_rows[:, :k], exact_rows[:, :k]
    hits = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum()
    return float(hits) / float(e.shape[0] * e.shape[1]) if e.size else 1.0


def measure_qps(run, num_queries: int, min_seconds: float = 0.5, max_repeats: int = 5) -> float:
    """Queries per second of `run()` (which searches `num_queries` queries): the best of a few repeats."""
    best = math.inf
    spent, repeats = 0.0, 0
    while repeats < max_repeats and (repeats < 2 or spent < min_seconds):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return num_queries / max(best, 1e-9)


def _candidates(plan: IndexPlan, k: int) -> tuple[list[int | None], list[int | None]]:
    if plan.strategy == "brute_force":
        return [None], [None]
    reorders = sorted({min(r, plan.num_docs) for r in REORDER_STEPS if r >= k} | {min(max(k, 1000), plan.num_docs)})
    if plan.strategy == "ah":
        return [None], reorders
    leaves = sorted({max(1, math.ceil(plan.num_leaves * f)) for f in LEAF_FRACTIONS} | {plan.num_leaves})
    return leaves, reorders


def tune(searcher, plan: IndexPlan, tune_set: tuple[np.ndarray, np.ndarray],
         verify_set: tuple[np.ndarray, np.ndarray], target: float = 0.95, k: int = 10) -> dict:
    """The fastest (leaves_to_search, reorder) whose recall@k reaches `target`, checked on held-out queries.

    `tune_set` and `verify_set` are (queries, exact top-k rows). Settings are chosen on the tune set with a small
    margin, then recall and QPS are measured on the verify set (the figures reported); if the verify set misses
    the target, the margin grows until it does or the search is exhaustive.
    """
    leaves, reorders = _candidates(plan, k)
    tune_q, tune_truth = tune_set
    verify_q, verify_truth = verify_set

    def recall(q, truth, leaf, reorder):
        return recall_at_k(search(searcher, q, k, leaf, reorder)[0], truth, k)

    cache: dict[tuple, float] = {}

    def tune_recall(leaf, reorder):
        if (leaf, reorder) not in cache:
            cache[(leaf, reorder)] = recall(tune_q, tune_truth, leaf, reorder)
        return cache[(leaf, reorder)]

    for margin in (0.005, 0.015, 0.03, 0.05, 1.0):
        goal = min(1.0, target + margin)
        # Recall grows with both knobs: find the fewest leaves that can reach the goal at the deepest reorder,
        # then for it and the next two leaf counts the shallowest reorder, and keep the fastest of those pairs.
        first = next((i for i, leaf in enumerate(leaves) if tune_recall(leaf, reorders[-1]) >= goal), len(leaves) - 1)
        feasible = []
        for leaf in leaves[first:first + 3]:
            reorder = next((r for r in reorders if tune_recall(leaf, r) >= goal), reorders[-1])
            qps = measure_qps(lambda: search(searcher, tune_q, k, leaf, reorder), len(tune_q), min_seconds=0.2)
            feasible.append((qps, leaf, reorder))
        _, leaf, reorder = max(feasible, key=lambda item: item[0])
        verified = recall(verify_q, verify_truth, leaf, reorder)
        exhaustive = leaf == leaves[-1] and reorder == reorders[-1]
        if verified >= target or exhaustive:
            break
    qps = measure_qps(lambda: search(searcher, verify_q, k, leaf, reorder), len(verify_q))
    return {"leaves_to_search": leaf, "reorder": reorder, f"recall@{k}": verified, "qps": qps,
            "target_recall": target, "tune_queries": int(len(tune_q)), "verify_queries": int(len(verify_q)),
            "tune_recall": tune_recall(leaf, reorder), "reached_target": bool(verified >= target)}


def split_tune_verify(queries: np.ndarray, seed: int = 0, max_queries: int = 4000):
    """Shuffles held-out queries and halves them: (tune, verify). At most `max_queries` are used."""
    order = np.random.default_rng(seed).permutation(len(queries))[:max_queries]
    half = max(1, len(order) // 2)
    return queries[np.sort(order[:half])], queries[np.sort(order[half:] if len(order) > 1 else order)]
