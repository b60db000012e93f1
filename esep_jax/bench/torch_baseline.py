"""The full-corpus softmax written plainly in PyTorch (CPU): the baseline `bench train` compares against.

It is what a user would write first: a linear head, `[B, N]` logits, logsumexp minus the grade-weighted positive
logits, `loss.backward()`. Run as a subprocess with an address-space cap, so a batch whose logits do not fit
fails with an out-of-memory error that is reported instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _step_seconds(corpus_size: int, dim: int, batch: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(corpus_size, dim), dim=1)
    queries = torch.randn(batch, dim)
    head = torch.nn.Linear(dim, dim)
    positive_ids = torch.randint(0, corpus_size, (batch, 4))
    targets = torch.full((batch, 4), 0.25)

    def step():
        logits = head(queries) @ corpus.T / 0.05
        loss = (torch.logsumexp(logits, dim=1) - (targets * logits.gather(1, positive_ids)).sum(1)).mean()
        loss.backward()
        head.zero_grad()

    step()  # warm-up: allocator, kernels
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "step_s": best, "pairs_per_s": batch * corpus_size / best, "peak_bytes": peak,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def measure_torch(corpus_size: int, dim: int, batch: int, steps: int = 1, memory_fraction: float = 0.7,
                  timeout_s: float = 1800) -> dict:
    """Runs the baseline in a subprocess capped at `memory_fraction` of RAM; status 'ok', 'oom' or a reason."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"status": "torch not installed (pip install 'esep-jax[bench]')"}
    cap = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * memory_fraction)
    command = [sys.executable, "-m", "esep_jax.bench.torch_baseline", str(corpus_size), str(dim), str(batch),
               str(steps), str(cap)]
    try:
        # The child caps its own address space first thing: no Python runs between fork and exec here.
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if lines:
        return json.loads(lines[-1][len("RESULT"):])
    error = done.stderr.lower()
    if "memory" in error or "alloc" in error or done.returncode in (-9, 137):
        return {"status": "oom", "memory_cap_bytes": cap}
    return {"status": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}


if __name__ == "__main__":
    n, d, b, s, cap = (int(v) for v in sys.argv[1:6])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print("RESULT" + json.dumps(_step_seconds(n, d, b, s)), flush=True)
