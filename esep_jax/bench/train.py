"""`esep-jax bench train`: the full-corpus train step against the hardware's own matmul speed, and PyTorch.

Every figure is a ratio measured in one run on one machine:
- utilisation = the step's achieved FLOP/s, counting 4·B·N·d per step (scores, and the gradient to the queries;
  the one-pass VJP recomputes nothing), ÷ the best FLOP/s of plain `[B, d] × [d, chunk]` matmuls over compute-bound
  chunk sizes, timed here just before (a single `[B, N]` product would be memory-bound and flatter us);
- pairs/s = B·N (query, document) pairs scored and differentiated per second;
- peak bytes = what XLA's buffer assignment reserves for the compiled step (arguments + outputs + temporaries),
  or the device's own peak counter where it has one; the corpus is part of it, the rest must stay O(B·chunk);
- torch_ratio = our pairs/s ÷ those of the same loss written plainly in PyTorch (`torch_baseline.py`), run in a
  subprocess with a memory cap so an out-of-memory is reported, not fatal.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from esep_jax.config import Config, override
from esep_jax.objectives import build_terms
from esep_jax.objectives.corpus_softmax import CORPUS, ShardedCorpus, make_data_corpus_mesh
from esep_jax.runs.state import run_components
from esep_jax.training.step import make_train_step

MATMUL_CHUNKS = (2048, 4096, 8192)


def _best_time(fn, repeats: int) -> float:
    fn()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(batch_per_device: int, dim: int, dtype, mesh, repeats: int = 3, rows: int = 65536) -> float:
    """The best FLOP/s of `[b, d] × [d, chunk]` products run on every device of `mesh` at once, over
    compute-bound chunk sizes (scanned inside one program, so no dispatch overhead). Running all devices
    together matters where "devices" share hardware, as CPU devices share cores."""
    every = P(tuple(mesh.axis_names))
    devices = mesh.devices.size
    best = 0.0
    queries = jax.device_put(jnp.ones((devices * batch_per_device, dim), dtype), NamedSharding(mesh, every))
    for chunk in MATMUL_CHUNKS:
        num_blocks = max(1, rows // chunk)
        blocks = jax.device_put(jnp.ones((devices * num_blocks, chunk, dim), dtype), NamedSharding(mesh, every))

        def local_products(queries, blocks):
            def body(total, block):
                return total + jnp.einsum("bd,nd->bn", queries, block, preferred_element_type=jnp.float32).sum(), None
            start = jax.lax.pcast(jnp.zeros((), jnp.float32), tuple(mesh.axis_names), to="varying")
            total = jax.lax.scan(body, start, blocks)[0]
            return total[None]

        products = jax.jit(jax.shard_map(local_products, mesh=mesh, in_specs=(every, every), out_specs=every))
        seconds = _best_time(lambda: products(queries, blocks), repeats)
        best = max(best, 2.0 * devices * batch_per_device * dim * num_blocks * chunk / seconds)
    return best


def _compiled_step(corpus_size: int, dim: int, batch: int, *, chunk: int, dtype: str, corpus_shards: int | None,
                   seed: int, members: int):
    """(compiled step, state, arguments, corpus, mesh, static peak bytes) for synthetic data of these sizes."""
    devices = jax.device_count()
    mesh = make_data_corpus_mesh(corpus_shards or devices)
    corpus_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(seed)
    corpus_rows = rng.standard_normal((corpus_size, dim), dtype=np.float32)
    corpus_rows /= np.linalg.norm(corpus_rows, axis=1, keepdims=True)
    corpus = ShardedCorpus(corpus_rows, mesh, chunk=chunk, dtype=corpus_dtype)
    del corpus_rows
    config = override(Config(), {"train.batch_size": batch, "train.corpus_chunk": chunk, "train.seed": seed,
                                 "ensemble.members": members, "train.num_steps": 1000})
    head, optimizer, schedule, fresh_state = run_components(config, dim, dim)
    step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, build_terms(config)),
                   donate_argnums=(0,))
    sharding = NamedSharding(mesh, P("data"))
    queries = rng.standard_normal((batch, dim), dtype=np.float32)
    # Unit-norm like the corpus and like the embeddings the tool trains on (raw Gaussian queries of norm √d at
    # τ = 0.03 spread logits over ±650, which no sentence encoder's do; docs/performance.md shows their cost).
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    batch_arrays = jax.device_put({
        "queries": queries,
        "positive_ids": rng.integers(0, corpus_size, (batch, 4)).astype(np.int32),
        "positive_weights": np.ones((batch, 4), np.float32)}, sharding)
    state = jax.device_put(fresh_state(), NamedSharding(mesh, P()))
    arguments = (batch_arrays, {"corpus": (corpus.embeddings, corpus.logit_bias)})
    compiled = step.lower(state, *arguments).compile()
    memory = compiled.memory_analysis()
    static_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                   + memory.temp_size_in_bytes) if memory is not None else None
    return compiled, state, arguments, corpus, mesh, static_peak


def measure_step(corpus_size: int, dim: int, batch: int, *, chunk: int = 8192, dtype: str = "float32",
                 steps: int = 2, corpus_shards: int | None = None, seed: int = 0, members: int = 1) -> dict:
    """Times the real jitted train step (linear heads, full-corpus softmax) on this process's devices.

    With `members` > 1 the step trains an ensemble: every member scores the batch against the corpus, so the
    work — and the FLOPs counted — grow by the number of members."""
    devices = jax.device_count()
    corpus_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    compiled, state, arguments, corpus, mesh, static_peak = _compiled_step(
        corpus_size, dim, batch, chunk=chunk, dtype=dtype, corpus_shards=corpus_shards, seed=seed, members=members)
    state, metrics = compiled(state, *arguments)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, *arguments)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", static_peak)
    flops = 4.0 * members * batch * corpus_size * dim
    # The step's per-device matmuls are [E·B / data, d] × [d, chunk]: the same shapes, on all devices at once.
    peak_flops = matmul_flops(members * batch // mesh.shape["data"], dim, corpus_dtype, mesh)
    return {
        "devices": devices, "mesh": dict(mesh.shape), "members": members, "corpus_size": corpus_size, "dim": dim,
        "batch": batch,
        "chunk": corpus.chunk, "dtype": dtype, "step_s": best, "flops_per_step": flops,
        "achieved_flops": flops / best, "matmul_flops": peak_flops, "utilization": flops / best / peak_flops,
        "pairs_per_s": members * batch * corpus_size / best, "peak_bytes": peak,
        "corpus_bytes": corpus.nbytes // mesh.shape[CORPUS] * devices,
        "workspace_bytes": None if peak is None else peak - corpus.nbytes,
        "loss": float(metrics["loss"].mean()), "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }


def interleaved_member_cost(corpus_size: int, dim: int, batch: int, members: int, *, chunk: int = 8192,
                            dtype: str = "float32", rounds: int = 5, seed: int = 0) -> dict:
    """Per-member cost of an ensemble, `(ensemble step / E) ÷ single step`, from alternating timings.

    A single head's step and an E-member ensemble's step are compiled side by side and timed in turns, the
    best of `rounds` kept for each, so a machine whose speed drifts (other jobs, clock changes) slows both
    alike instead of biasing the ratio."""
    built = {count: _compiled_step(corpus_size, dim, batch, chunk=chunk, dtype=dtype, corpus_shards=None,
                                   seed=seed, members=count) for count in (1, members)}
    states = {count: b[1] for count, b in built.items()}
    best = {count: float("inf") for count in built}
    for round_index in range(rounds + 1):
        for count, (compiled, _, arguments, *_) in built.items():
            start = time.perf_counter()
            states[count], metrics = compiled(states[count], *arguments)
            jax.block_until_ready(metrics)
            if round_index:  # round 0 warms up
                best[count] = min(best[count], time.perf_counter() - start)
    return {"members": members, "single_step_s": best[1], "ensemble_step_s": best[members],
            "per_member_cost": best[members] / members / best[1], "rounds": rounds}


def measure_in_subprocess(devices: int, **options) -> dict:
    """`measure_step` under `JAX_NUM_CPU_DEVICES=devices` (the device count is fixed when JAX starts)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    code = ("import json, sys; from esep_jax.bench.train import measure_step; "
            f"print('RESULT' + json.dumps(measure_step(**{options!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark on {devices} devices failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def run_benchmarks(corpus_sizes, dims, batches, device_counts, *, chunk: int, dtype: str, steps: int,
                   torch: bool, torch_memory_fraction: float = 0.7, progress=None, members=(1,)) -> list[dict]:
    """Every (N, d, B, devices, members) combination; the PyTorch baseline once per (N, d, B).

    Where a single head and an ensemble of E are both measured, the ensemble's record gets
    `per_member_cost` = (its step time / E) ÷ the single head's step time."""
    from esep_jax.bench.torch_baseline import measure_torch

    records = []
    for corpus_size, dim, batch in itertools.product(corpus_sizes, dims, batches):
        baseline = measure_torch(corpus_size, dim, batch, memory_fraction=torch_memory_fraction) \
            if torch else {"status": "skipped"}
        for devices in device_counts:
            single = None
            for member_count in members:
                options = dict(corpus_size=corpus_size, dim=dim, batch=batch, chunk=chunk, dtype=dtype,
                               steps=steps, members=member_count)
                record = measure_step(**options) if devices == jax.device_count() else \
                    measure_in_subprocess(devices, **options)
                if member_count == 1:
                    single = record
                elif single is not None and devices == jax.device_count():
                    # Sequential timings carry the machine's drift; the alternating measurement does not.
                    record["per_member_cost_sequential"] = record["step_s"] / member_count / single["step_s"]
                    record["per_member_cost"] = interleaved_member_cost(
                        corpus_size, dim, batch, member_count, chunk=chunk, dtype=dtype,
                        rounds=max(steps, 3))["per_member_cost"]
                elif single is not None:
                    record["per_member_cost"] = record["step_s"] / member_count / single["step_s"]
                torch_pairs = baseline.get("pairs_per_s") if member_count == 1 else None
                record.update(torch_status=baseline["status"], torch_pairs_per_s=baseline.get("pairs_per_s"),
                              torch_peak_bytes=baseline.get("peak_bytes"),
                              torch_ratio=record["pairs_per_s"] / torch_pairs if torch_pairs else None)
                records.append(record)
                if progress:
                    progress(record)
    return records
