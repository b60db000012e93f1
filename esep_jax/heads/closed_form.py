"""Closed-form query maps: the baselines a learned searching module must beat.

Every fit returns `(W, b)` with `W: [d_in, d_out]`, `b: [d_out]` (float32), applied as `f(q) = q @ W + b`
(`apply_map`). `source` rows are query vectors; `target` rows are what `f` should produce for them: the same
queries under another encoder (drift compensation: map a new encoder B's queries into an old encoder A's index),
or their relevant documents (`supervised_targets`). `E = np.eye(d_in, d_out)` is the rectangular identity,
the same truncation / zero-padding as `esep_jax.heads.base.base_projection`.

- `mean_shift`: `W = E`, `b = mean(target − source E)` — QDC's single drift vector.
- `orthogonal_procrustes`: `W` with orthonormal rows or columns minimising `‖source W − target‖`.
- `ridge`: regularised least squares with an intercept, shrinking `W` towards 0 or towards `E`; towards `E`,
  `alpha → ∞` is exactly `mean_shift` and `alpha = 0` is ordinary least squares.
- `choose_alpha`: the ridge alpha with the best dev metric (nDCG@10) under a `SplitEvaluator`.

numpy/scipy only: evaluation (jax) is reached only through the evaluator object handed to `choose_alpha`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.linalg

from esep_jax.errors import InputError

Map = tuple[np.ndarray, np.ndarray]


def rectangular_identity(d_in: int, d_out: int) -> np.ndarray:
    """`E [d_in, d_out]`: `q @ E` keeps the first min(d_in, d_out) coordinates and zero-pads the rest."""
    return np.eye(d_in, d_out, dtype=np.float64)


def identity_map(d_in: int, d_out: int) -> Map:
    """The untrained searching module `f(q) = q E`."""
    return _as_map(rectangular_identity(d_in, d_out), np.zeros(d_out))


def apply_map(queries, transform: Map) -> np.ndarray:
    """`queries @ W + b` in float32."""
    W, b = transform
    return (np.asarray(queries, np.float32) @ W + b).astype(np.float32)


def mean_shift(source, target) -> Map:
    """QDC's drift vector: `W = E`, `b = mean(target − source E)`.

    Only meaningful when both sides share one coordinate system (same dim, related models); when the dims
    differ `E` truncates or zero-pads the source like `base_projection`, which is rarely what the target means.
    """
    source, target = _pair(source, target)
    E = rectangular_identity(source.shape[1], target.shape[1])
    return _as_map(E, (target - source @ E).mean(axis=0))


def orthogonal_procrustes(source, target, *, center: bool = False) -> Map:
    """The rotation (or isometric embedding / orthogonal projection) minimising `‖source W − target‖_F`.

    Equal dims: `W = U Vᵀ` from the SVD `sourceᵀ target = U Σ Vᵀ`, orthogonal. Different dims: zero-pad the
    smaller side to `D = max(d_in, d_out)` columns, solve the `D × D` problem, and keep `W = R[:d_in, :d_out]`.
    The padded solution is `U Vᵀ` of the thin SVD of the `[d_in, d_out]` cross-covariance, computed directly:
    for `d_in < d_out` its rows are orthonormal (an isometric embedding, `‖q W‖ = ‖q‖`); for `d_in > d_out`
    its columns are (the orthogonal projection that keeps the best-aligned `d_out`-dim subspace).

    `center=True` solves on mean-centred data and returns the translation `b = mean(target) − mean(source) W`;
    otherwise `b = 0` (a pure rotation, as in Drift-Adapter's Procrustes baseline).
    """
    source, target = _pair(source, target)
    mu_s = source.mean(axis=0) if center else np.zeros(source.shape[1])
    mu_t = target.mean(axis=0) if center else np.zeros(target.shape[1])
    u, _, vt = np.linalg.svd((source - mu_s).T @ (target - mu_t), full_matrices=False)
    W = u @ vt
    return _as_map(W, mu_t - mu_s @ W)


def ridge(source, target, alpha: float, *, towards: str = "zero", fit_intercept: bool = True) -> Map:
    """`argmin ‖source W + b − target‖² + alpha ‖W − P‖²` with `P = 0` (`towards="zero"`) or `P = E`
    (`towards="identity"`, the natural prior of a searching module: deviate from the base query only as far
    as the data asks). The intercept `b` is not penalised. `alpha = np.inf` returns `W = P` exactly.

    Closed form on centred data `S, T`: `W = (SᵀS + alpha I)⁻¹ (SᵀT + alpha P)`; `b = mean(t) − mean(s) W`.
    """
    return next(iter(ridge_path(source, target, [alpha], towards=towards, fit_intercept=fit_intercept)))


def ridge_path(source, target, alphas: Iterable[float], *, towards: str = "zero",
               fit_intercept: bool = True) -> Iterable[Map]:
    """`ridge` for each alpha, from one eigendecomposition of the Gram matrix (cheap over a grid)."""
    source, target = _pair(source, target)
    if towards not in ("zero", "identity"):
        raise ValueError(f"towards must be 'zero' or 'identity', got {towards!r}")
    d_in, d_out = source.shape[1], target.shape[1]
    P = rectangular_identity(d_in, d_out) if towards == "identity" else np.zeros((d_in, d_out))
    mu_s = source.mean(axis=0) if fit_intercept else np.zeros(d_in)
    mu_t = target.mean(axis=0) if fit_intercept else np.zeros(d_out)
    S, T = source - mu_s, target - mu_t
    eigenvalues, V = scipy.linalg.eigh(S.T @ S)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    cross = V.T @ (S.T @ T)  # SᵀT in the eigenbasis
    prior = V.T @ P
    for alpha in alphas:
        alpha = float(alpha)
        if alpha < 0 or np.isnan(alpha):
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if np.isinf(alpha):
            W = P.copy()
        elif alpha == 0.0:
            W = np.linalg.lstsq(S, T, rcond=None)[0]  # minimum-norm least squares, even when SᵀS is singular
        else:
            W = V @ ((cross + alpha * prior) / (eigenvalues + alpha)[:, None])
        yield _as_map(W, mu_t - mu_s @ W)


def default_alphas(source, num: int = 17) -> np.ndarray:
    """`0`, a log grid around the scale of the data (`mean eigenvalue of SᵀS × 10^[-5 … 3]`), then `inf`."""
    source = np.asarray(source, np.float64)
    scale = float(((source - source.mean(axis=0)) ** 2).sum() / source.shape[1]) or 1.0
    return np.concatenate([[0.0], scale * np.logspace(-5, 3, num), [np.inf]])


def relevant_targets(qrels, corpus, relevance_level: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`(positions, targets)`: for each query of a CSR `Qrels` with a document graded `>= relevance_level`,
    its position in the split and the grade-weighted mean of those documents' rows of `corpus`."""
    positions, targets = [], []
    for i in range(qrels.num_queries):
        docs, grades = qrels.judgements(i)
        keep = grades >= relevance_level
        if not keep.any():
            continue
        weights = grades[keep].astype(np.float64)
        positions.append(i)
        targets.append(weights @ np.asarray(corpus[docs[keep]], np.float64) / weights.sum())
    if not positions:
        raise ValueError(f"no query has a document graded >= {relevance_level}")
    return np.asarray(positions, np.int64), np.stack(targets)


def supervised_targets(dataset, split: str, relevance_level: int = 1, *, queries=None,
                       corpus=None) -> tuple[np.ndarray, np.ndarray]:
    """`(query vectors, target vectors)` of a split: a query's target is the grade-weighted mean of its
    relevant documents' embeddings, so `ridge` / `orthogonal_procrustes` fit "query → its positives".

    `queries` is an optional full `[Q, d]` query table in the dataset's row order (e.g. another encoder's
    vectors of the same queries) used instead of the dataset's own; `corpus` likewise replaces its corpus.
    Queries without a relevant document are left out.
    """
    qrels = dataset.qrels(split)
    corpus = dataset.read_corpus() if corpus is None else corpus
    positions, targets = relevant_targets(qrels, corpus, relevance_level)
    rows = qrels.query_rows[positions]
    vectors = dataset.read_queries(rows) if queries is None else np.asarray(queries, np.float32)[rows]
    return vectors.astype(np.float32), targets.astype(np.float32)


def choose_alpha(source, target, evaluator, alphas=None, *, towards: str = "identity",
                 fit_intercept: bool = True, metric: str = "ndcg@10") -> tuple[float, Map, dict[float, float]]:
    """Fits `ridge` for every alpha and keeps the one with the best dev `metric`.

    `evaluator` is an `esep_jax.evaluation.evaluator.SplitEvaluator` on the dev split whose `.queries` hold the
    *source-side* vectors of its judged queries (`rank(transform).metrics[metric]`). `alphas` defaults to
    `default_alphas(source)` (from `0`, least squares, to `inf`, `W = P`). Ties keep the larger alpha (the
    stronger prior).
    Returns `(alpha, (W, b), {alpha: dev metric})`.
    """
    alphas = default_alphas(source) if alphas is None else np.asarray(list(alphas), np.float64)
    scores: dict[float, float] = {}
    best = None
    for alpha, fitted in zip(alphas, ridge_path(source, target, alphas, towards=towards,
                                                fit_intercept=fit_intercept)):
        score = float(evaluator.rank(lambda q, m=fitted: apply_map(q, m)).metrics[metric])
        scores[float(alpha)] = score
        if best is None or score > best[0] or (score == best[0] and alpha > best[1]):
            best = (score, float(alpha), fitted)
    return best[1], best[2], scores


def paired_rows(dataset, train_qrels) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) vectors of every text embedded by both encoders: training queries with a target
    vector, then the paired texts."""
    sources, targets = [], []
    if dataset.has_query_targets:
        rows = np.asarray(train_qrels.query_rows, np.int64)
        sources.append(dataset.read_queries(rows))
        targets.append(dataset.table("queries/targets")[rows].read().result().astype(np.float32))
    if dataset.num_paired:
        sources.append(dataset.table("paired/source").read().result().astype(np.float32))
        targets.append(dataset.table("paired/target").read().result().astype(np.float32))
    if not sources:
        raise InputError("paired initialisers need target vectors: ingest with --query-targets and/or "
                         "--paired-source/--paired-target", file=dataset.location, field="config.model.init")
    return np.concatenate(sources), np.concatenate(targets)


def _pair(source, target) -> tuple[np.ndarray, np.ndarray]:
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0]:
        raise ValueError(f"source and target must be [n, d] with the same n, got {source.shape} and {target.shape}")
    if source.shape[0] == 0:
        raise ValueError("no rows to fit")
    return source, target


def _as_map(W, b) -> Map:
    return np.asarray(W, np.float32), np.asarray(b, np.float32)
