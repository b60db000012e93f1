"""Combining ensemble members into one searching module.

Under the dot product, the mean of the members' query vectors scores every document with the mean of the
members' scores, `<Σ w_m f_m(q), d> = Σ w_m <f_m(q), d>`, so a combination is itself a single head (and for
linear heads, a single matrix). Weights come from greedy ensemble selection on dev (Caruana et al., 2004):
starting from nothing, repeatedly add — with replacement — the member that most improves the dev metric of
the running mean, until no addition helps.
"""

from __future__ import annotations

import numpy as np


def greedy_selection(member_vectors: np.ndarray, score, max_rounds: int | None = None) -> tuple[np.ndarray, float]:
    """Weights `[E]` (summing to 1) chosen greedily, and the combination's score.

    `member_vectors`: `[E, Q, d]` dev query vectors of every member; `score(vectors [Q, d]) -> float` the dev
    metric of searching with those vectors. Ties keep the earlier (smaller) selection.
    """
    members = member_vectors.shape[0]
    counts = np.zeros(members, np.int64)
    total = np.zeros(member_vectors.shape[1:], np.float64)
    best = -np.inf
    for _ in range(max_rounds or 2 * members):
        candidates = [score(((total + member_vectors[m]) / (counts.sum() + 1)).astype(np.float32))
                      for m in range(members)]
        choice = int(np.argmax(candidates))
        if candidates[choice] <= best:
            break
        best = candidates[choice]
        counts[choice] += 1
        total += member_vectors[choice]
    return counts / counts.sum(), float(best)


def combine(member_vectors, weights):
    """`Σ_m w_m · vectors[m]` over the leading member axis (numpy or jax arrays)."""
    return (member_vectors * weights.reshape((-1,) + (1,) * (member_vectors.ndim - 1))).sum(axis=0)
