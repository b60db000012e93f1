"""The train state and the pure train step `(state, batch) -> (state, metrics)`.

The state carries everything a resumed run needs to continue bit for bit: parameters, optimiser state, the
step counter and the early-stopping record (best parameters, their dev score and step, evaluations since).
Keys are `fold_in(seed_key, step)` inside the step, so no key is ever stored or returned.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from esep_jax.config import Config, OptimConfig
from jax.sharding import Mesh

from esep_jax.corpus_softmax import DATA, make_corpus_softmax_loss
from esep_jax.losses import in_batch_softmax_loss, recovery_penalty, sample_positive
from esep_jax.models.heads import base_projection, init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimiser steps taken
    params: Any
    opt_state: Any
    best_params: Any  # the parameters with the best dev score so far (the identity before any training)
    best_score: jax.Array  # float32
    best_step: jax.Array  # int32
    evals_since_best: jax.Array  # int32
    stopped: jax.Array  # bool: early stopping fired; a resumed run does not train further


def make_optimizer(config: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=config.learning_rate * config.end_learning_rate_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    return optimizer, schedule


def create_state(head: nn.Module, optimizer: optax.GradientTransformation, seed: int, query_dim: int) -> TrainState:
    """A fresh state: the head's initial parameters (which reproduce the base retrieval) are also the best."""
    params = init_params(head, jax.random.key(seed), query_dim)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        best_params=jax.tree.map(jnp.copy, params), best_score=jnp.full((), -jnp.inf, jnp.float32),
        best_step=jnp.zeros((), jnp.int32), evals_since_best=jnp.zeros((), jnp.int32),
        stopped=jnp.zeros((), jnp.bool_))


def make_train_step(head: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    config: Config, mesh: Mesh) -> Callable:
    """Builds `train_step(state, batch, corpus) -> (state, metrics)`; jit it, donating the state.

    `corpus` is the `(embeddings, mask)` pair of a `ShardedCorpus` on `mesh`: rows split over the `corpus` axis,
    the mask marking the documents the full-corpus softmax contrasts against. The batch is split over `data`.
    With `train.micro_batch_size`, the global batch is processed in micro-batches whose gradients are summed,
    so a batch of any size runs in bounded memory with the result of one big batch. Config values are closed
    over as Python constants, so they are compiled in rather than traced.
    """
    loss_config, batch_size = config.loss, config.train.batch_size
    num_micro = batch_size // (config.train.micro_batch_size or batch_size)
    data_size = mesh.shape[DATA]
    seed_key = jax.random.key(config.train.seed)
    corpus_loss = make_corpus_softmax_loss(mesh, temperature=loss_config.temperature, z_loss=loss_config.z_loss,
                                           chunk=config.train.corpus_chunk)

    def summed_loss(params, batch, corpus, key):
        """Sums over the (micro-)batch; the caller divides by the global batch size."""
        queries, positive_ids, positive_weights = batch["queries"], batch["positive_ids"], batch["positive_weights"]
        vectors = head.apply({"params": params}, queries, train=True,
                             rngs={"dropout": jax.random.fold_in(key, 0)})
        if loss_config.kind == "full_corpus":
            per_query = corpus_loss(vectors, corpus, positive_ids, positive_weights)
        else:
            sampled = sample_positive(jax.random.fold_in(key, 1), positive_ids, positive_weights)
            per_query = in_batch_softmax_loss(vectors, corpus[0][sampled], sampled, positive_ids,
                                              positive_weights, loss_config.temperature)
        task = per_query.sum()
        recovery = recovery_penalty(vectors, base_projection(queries, vectors.shape[-1])).sum()
        return task + loss_config.recovery_weight * recovery, (task, recovery)

    summed_grad = jax.grad(summed_loss, has_aux=True)

    def micro_batched_grad(params, batch, corpus, key):
        # Micro-batch m takes rows m·b_local … (m+1)·b_local − 1 of *every* data shard, so each micro-batch
        # stays spread over all devices and the reshape moves no data between them.
        def split(values):
            local = values.reshape(data_size, num_micro, -1, *values.shape[1:])
            return jnp.swapaxes(local, 0, 1).reshape(num_micro, -1, *values.shape[1:])

        def accumulate(total, micro_and_index):
            micro_batch, index = micro_and_index
            grads, sums = summed_grad(params, micro_batch, corpus, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())))
        micro_batches = jax.tree.map(split, batch)
        total, _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(num_micro)))
        return total

    def train_step(state: TrainState, batch: dict, corpus: tuple[jax.Array, jax.Array]):
        key = jax.random.fold_in(seed_key, state.step)
        if num_micro == 1:
            grads, (task, recovery) = summed_grad(state.params, batch, corpus, key)
        else:
            grads, (task, recovery) = micro_batched_grad(state.params, batch, corpus, key)
        grads = jax.tree.map(lambda g: g / batch_size, grads)
        task, recovery = task / batch_size, recovery / batch_size
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": task + loss_config.recovery_weight * recovery, "task_loss": task, "recovery": recovery,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
