"""End-to-end benchmarks of the trainer: time to a trained head, and host against device time per step.

- `time_to_head`: `esep-jax train` (defaults) and the plain PyTorch loop of the same head (`torch_loop.py`), each
  in a fresh process so start-up counts, timed in alternation (a drifting machine slows both alike), with the
  dev nDCG@10 each reached and where esep_jax's time went (the run's `summary["timings"]`).
- `host_and_device`: the real loader and the real jitted step on a dataset at a given batch size: per step, the
  host's time to assemble and place a batch, and the device's time for the step itself (synchronised), measured
  separately in the same run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed_process(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, done


def time_to_head(data: str, rounds: int = 2, overrides: list[str] = ()) -> dict:
    """The best of `rounds` alternating runs of each trainer: wall seconds, dev nDCG@10, esep_jax's breakdown."""
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="esep-bench-") as scratch:
        for round_index in range(rounds):
            workdir = Path(scratch) / f"run{round_index}"
            seconds, done = _timed_process([sys.executable, "-m", "esep_jax", "train", "--data", data, "--workdir",
                                            str(workdir), "--no-progress", *[f"--config.{o}" for o in overrides]])
            if done.returncode != 0:
                raise RuntimeError(f"esep-jax train failed: {done.stderr.strip()[-500:]}")
            summary = json.loads((workdir / "summary.json").read_text())
            ours.append({"wall_s": seconds, "dev_ndcg@10": summary["best_dev"]["ndcg@10"],
                         "best_step": summary["best_step"], "steps": summary["steps"], "timings": summary["timings"]})
            shutil.rmtree(workdir)
            seconds, done = _timed_process([sys.executable, "-m", "esep_jax.bench.torch_loop", data])
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"the PyTorch loop failed: {done.stderr.strip()[-500:]}")
            theirs.append({"wall_s": seconds, **json.loads(lines[-1][len("RESULT"):])})
    best_ours, best_theirs = min(ours, key=lambda r: r["wall_s"]), min(theirs, key=lambda r: r["wall_s"])
    reached = time_to_reach(best_theirs, best_ours["dev_ndcg@10"])
    return {"data": data, "rounds": rounds, "esep_jax": best_ours, "pytorch": best_theirs,
            "speedup": best_theirs["wall_s"] / best_ours["wall_s"],
            # The strictest reading of "sooner": the PyTorch loop's wall time until it first held a head at
            # least as good on dev as esep_jax's best (None: it never did), against esep_jax's whole run.
            "pytorch_s_to_equal_dev": reached,
            "sooner_for_equal_dev": reached is None or best_ours["wall_s"] <= reached,
            "all_esep_jax": ours, "all_pytorch": theirs}


def time_to_reach(loop_result: dict, dev: float) -> float | None:
    """Wall seconds (process start-up included) until the PyTorch loop's dev nDCG@10 first reached `dev`."""
    startup = loop_result["wall_s"] - loop_result["total_s"]
    for _, seconds, score in loop_result["curve"]:
        if score >= dev:
            return startup + seconds
    return None


def host_and_device(data: str, batch_size: int, steps: int = 5, overrides: list[str] = ()) -> dict:
    """Mean seconds per step of batch assembly + placement (host) and of the step itself (device)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from esep_jax.config import load_config
    from esep_jax.data.loader import TrainBatches
    from esep_jax.objectives import CORPUS
    from esep_jax.objectives.corpus_softmax import DATA, ShardedCorpus
    from esep_jax.runs.state import run_components
    from esep_jax.training.plan import plan_training
    from esep_jax.training.step import make_train_step

    config = load_config(None, [f"train.batch_size={batch_size}", *overrides])
    plan = plan_training(config, data)
    dataset, mesh = plan.dataset, plan.mesh
    corpus = ShardedCorpus(dataset.corpus_table(), mesh, config.train.corpus_chunk)
    tables = {CORPUS: (corpus.embeddings, corpus.logit_bias)}
    head, optimizer, schedule, fresh_state = run_components(config, dataset.query_dim, dataset.corpus_dim)
    step_fn = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, plan.terms), donate_argnums=(0,))
    state = jax.device_put(fresh_state(), NamedSharding(mesh, P()))
    batches = TrainBatches(dataset, plan.train_qrels, batch_size=batch_size, max_positives=config.loss.max_positives,
                           seed=0, prefetch=0)
    sharding = NamedSharding(mesh, P(DATA))
    # The host's work on its own: making and placing each batch while nothing else runs. (Timed right after a
    # step instead, it also pays for the XLA CPU runtime's threads winding down on the same cores.)
    host = []
    placed = []
    for step in range(steps + 1):
        start = time.perf_counter()
        placed.append(jax.device_put(batches.batch_at(step), sharding))
        jax.block_until_ready(placed[-1])
        host.append(time.perf_counter() - start)
    state, metrics = step_fn(state, placed[0], tables)  # compiles
    jax.block_until_ready(metrics)

    def run(make_batch) -> float:
        nonlocal state
        start = time.perf_counter()
        for step in range(1, steps + 1):
            state, metrics = step_fn(state, make_batch(step), tables)  # dispatched asynchronously
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    # The device alone (batches already placed), then the pipeline as training runs it: each step dispatched
    # asynchronously while the host makes and places the next batch. Their difference is what the host costs.
    device_s = run(lambda step: placed[step])
    pipeline_s = run(lambda step: jax.device_put(batches.batch_at(steps + step), sharding))
    host_s = float(np.mean(host[1:]))
    return {"data": data, "batch": batch_size, "steps": steps, "host_s": host_s, "device_s": device_s,
            "host_fraction": host_s / device_s, "pipeline_s": pipeline_s,
            "pipeline_overhead": pipeline_s / device_s - 1.0, "backend": jax.default_backend()}
