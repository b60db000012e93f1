"""Runs the sharded loss and train step on this process's devices; the parent test compares device counts.

Usage: JAX_NUM_CPU_DEVICES=N python tests/spmd_worker.py OUT.npz. For every (data, corpus) factorisation of
N it records the blockwise loss and gradient on fixed inputs and the parameters after a few train steps
(with and without micro-batching).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from esep_jax.config import Config, override
from esep_jax.objectives import build_terms
from esep_jax.objectives.corpus_listwise import make_corpus_listwise_loss
from esep_jax.objectives.corpus_softmax import DATA, ShardedCorpus, make_corpus_softmax_loss, make_data_corpus_mesh
from esep_jax.runs.state import run_components
from esep_jax.training.step import make_train_step

DOCS, DIM, BATCH, POSITIVES, STEPS = 203, 16, 32, 3, 4


def inputs(step: int):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, DOCS, size=(BATCH, POSITIVES)).astype(np.int32)
    ids[::5, 1:] = -1
    return {"queries": rng.normal(size=(BATCH, DIM)).astype(np.float32), "positive_ids": ids,
            "positive_weights": rng.integers(1, 3, size=(BATCH, POSITIVES)).astype(np.float32)}


def run(corpus_shards: int, corpus: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    mesh = make_data_corpus_mesh(corpus_shards)
    batch_sharding = NamedSharding(mesh, P(DATA))
    sharded = ShardedCorpus(corpus, mesh, chunk=16, mask=mask)
    results = {}

    loss = make_corpus_softmax_loss(mesh, temperature=0.1, z_loss=1e-3, chunk=16)
    batch = jax.device_put(inputs(0), batch_sharding)

    def total(queries):
        per_query = loss(queries, sharded, batch["positive_ids"], batch["positive_weights"])
        return per_query.sum(), per_query
    (_, per_query), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(batch["queries"])
    results["loss"], results["grad"] = np.asarray(per_query), np.asarray(grad)

    # The corpus listwise term (query drift): two members against a teacher, over the same sharded corpus.
    listwise = make_corpus_listwise_loss(mesh, chunk=16)
    rng = np.random.default_rng(7)
    students = jax.device_put(rng.normal(size=(2, BATCH, DIM)).astype(np.float32), NamedSharding(mesh, P(None, DATA)))
    teacher = jax.device_put(rng.normal(size=(BATCH, DIM)).astype(np.float32), batch_sharding)
    value, grad = jax.jit(jax.value_and_grad(
        lambda s: listwise(s, teacher, sharded.embeddings, sharded.logit_bias).sum()))(students)
    results["corpus_listwise"], results["corpus_listwise_grad"] = np.asarray(value), np.asarray(grad)

    for micro in (0, 8):
        config = override(Config(), {
            "train.batch_size": BATCH, "train.micro_batch_size": micro, "train.corpus_chunk": 16, "train.num_steps": 10,
            "loss.temperature": 0.1, "loss.z_loss": 1e-3, "loss.recovery_weight": 0.5,
            "optim.learning_rate": 0.05, "optim.warmup_steps": 0})  # parameters move well beyond atol
        head, optimizer, schedule, fresh_state = run_components(config, DIM, DIM)
        step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, build_terms(config)),
                       donate_argnums=(0,))
        state = jax.device_put(fresh_state(), NamedSharding(mesh, P()))
        for index in range(STEPS):
            state, metrics = step(state, jax.device_put(inputs(index + 1), batch_sharding),
                                  {"corpus": (sharded.embeddings, sharded.logit_bias)})
        for name, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            results[f"micro{micro}/params{jax.tree_util.keystr(name)}"] = np.asarray(leaf)
        results[f"micro{micro}/loss"] = np.asarray(metrics["loss"])
    return results


def main(out: str) -> None:
    rng = np.random.default_rng(123)
    corpus = (rng.normal(size=(DOCS, DIM)) / np.sqrt(DIM)).astype(np.float32)
    mask = rng.random(DOCS) < 0.8
    for step in range(STEPS + 1):  # positives must be contrasted documents
        ids = inputs(step)["positive_ids"]
        mask[ids[ids >= 0]] = True
    devices = jax.device_count()
    saved = {}
    for corpus_shards in [s for s in range(1, devices + 1) if devices % s == 0]:
        for name, value in run(corpus_shards, corpus, mask).items():
            saved[f"{devices // corpus_shards}x{corpus_shards}:{name}"] = value
    np.savez(out, **saved)


if __name__ == "__main__":
    main(sys.argv[1])
