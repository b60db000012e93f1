"""The full-corpus softmax step written plainly in PyTorch (CPU): the baselines `bench train` compares against.

Three versions a user would write, all a linear head, `[B, N]` logits and `loss.backward()`:
- `logsumexp`: logsumexp minus the grade-weighted positive logits (`gather`);
- `cross_entropy`: `F.cross_entropy(logits, probabilities)` with the multi-positive target as a dense `[B, N]`
  probability matrix — PyTorch's fused kernel;
- `compiled`: the `cross_entropy` step under `torch.compile` (where it compiles on this machine).
The fastest that runs is the baseline. Each runs as a subprocess with an address-space cap, so a batch whose
logits do not fit fails with an out-of-memory error that is reported instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("logsumexp", "cross_entropy", "compiled")


def _step_seconds(corpus_size: int, dim: int, batch: int, steps: int, variant: str) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    corpus = F.normalize(torch.randn(corpus_size, dim), dim=1)
    queries = F.normalize(torch.randn(batch, dim), dim=1)  # unit-norm like the JAX step's; speed is the same
    head = torch.nn.Linear(dim, dim)
    positive_ids = torch.randint(0, corpus_size, (batch, 4))
    weights = torch.full((batch, 4), 0.25)

    def logsumexp_step():
        logits = head(queries) @ corpus.T / 0.05
        loss = (torch.logsumexp(logits, dim=1) - (weights * logits.gather(1, positive_ids)).sum(1)).mean()
        loss.backward()

    targets = torch.zeros(batch, corpus_size).scatter_add_(1, positive_ids, weights)

    def cross_entropy_step():
        loss = F.cross_entropy(head(queries) @ corpus.T / 0.05, targets)
        loss.backward()

    step = logsumexp_step if variant == "logsumexp" else cross_entropy_step
    if variant == "compiled":
        step = torch.compile(cross_entropy_step)
    step()  # warm-up: allocator, kernels, compilation
    head.zero_grad()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
        head.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "variant": variant, "step_s": best, "pairs_per_s": batch * corpus_size / best,
            "peak_bytes": peak, "threads": torch.get_num_threads(), "torch": torch.__version__}


def measure_variant(corpus_size: int, dim: int, batch: int, variant: str, steps: int = 1,
                    memory_fraction: float = 0.7, timeout_s: float = 1800) -> dict:
    """One variant in a subprocess capped at `memory_fraction` of RAM; status 'ok', 'oom' or a reason."""
    cap = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * memory_fraction)
    command = [sys.executable, "-m", "esep_jax.bench.torch_baseline", str(corpus_size), str(dim), str(batch),
               str(steps), str(cap), variant]
    try:
        # The child caps its own address space first thing: no Python runs between fork and exec here.
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s", "variant": variant}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if lines:
        return json.loads(lines[-1][len("RESULT"):])
    error = done.stderr.lower()
    if "memory" in error or "alloc" in error or done.returncode in (-9, 137):
        return {"status": "oom", "variant": variant, "memory_cap_bytes": cap}
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode)
    return {"status": f"failed: {last[:200]}", "variant": variant}


def measure_torch(corpus_size: int, dim: int, batch: int, steps: int = 1, memory_fraction: float = 0.7,
                  variants=VARIANTS) -> dict:
    """Every variant; the fastest that ran is the result (`variants` holds them all)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"status": "torch not installed (pip install 'esep-jax[bench]')"}
    results = {variant: measure_variant(corpus_size, dim, batch, variant, steps, memory_fraction)
               for variant in variants}
    ran = [r for r in results.values() if r["status"] == "ok"]
    best = min(ran, key=lambda r: r["step_s"]) if ran else {"status": next(iter(results.values()))["status"]}
    return {**best, "variants": results}


if __name__ == "__main__":
    n, d, b, s, cap = (int(v) for v in sys.argv[1:6])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print("RESULT" + json.dumps(_step_seconds(n, d, b, s, sys.argv[6])), flush=True)
