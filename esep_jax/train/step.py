"""The train state and the pure train step `(state, batch) -> (state, metrics)` for an ensemble of heads.

Every run trains E ≥ 1 members at once: parameters and optimiser state carry a leading member axis, members
differ by seed and by per-member hyperparameters (learning rate, weight decay, temperature, recovery weight,
dropout), and all of them score the same batch against the corpus in one pass. The state also holds each
member's early-stopping record (best parameters, dev score and step, evaluations since, stopped), so a resumed
run continues bit for bit. Keys are `fold_in(seed_key, step)` inside the step; no key is stored or returned.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from esep_jax.config import Config, OptimConfig, member_values
from esep_jax.corpus_softmax import DATA, make_corpus_softmax_loss
from esep_jax.losses import in_batch_softmax_loss, recovery_penalty, sample_positive
from esep_jax.models.heads import base_projection, init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimiser steps taken
    params: Any  # every leaf [E, ...]
    opt_state: Any
    best_params: Any  # per member, the parameters with its best dev score (the identity before training)
    best_score: jax.Array  # float32 [E]
    best_step: jax.Array  # int32 [E]
    evals_since_best: jax.Array  # int32 [E]
    stopped: jax.Array  # bool [E]: early stopping fired; a stopped member's parameters no longer change


def make_optimizer(config: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam after global-norm clipping, and the warm-up + cosine schedule as a multiplier peaking at 1.

    The learning rate and decoupled weight decay are applied per member in the step (AdamW's update
    `−lr·(adam + wd·θ)`), so one compiled program trains members with different values.
    """
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=config.end_learning_rate_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(),
    )
    return optimizer, schedule


def create_state(head: nn.Module, optimizer: optax.GradientTransformation, seed: int, query_dim: int,
                 members: int = 1) -> TrainState:
    """A fresh state: member i initialised from `seed + i`; the initial heads (the identity) are the best."""
    keys = jnp.stack([jax.random.key(seed + i) for i in range(members)])
    params = jax.vmap(lambda key: init_params(head, key, query_dim))(keys)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.vmap(optimizer.init)(params),
        best_params=jax.tree.map(jnp.copy, params), best_score=jnp.full((members,), -jnp.inf, jnp.float32),
        best_step=jnp.zeros((members,), jnp.int32), evals_since_best=jnp.zeros((members,), jnp.int32),
        stopped=jnp.zeros((members,), jnp.bool_))


def apply_members(head: nn.Module, params, queries: jax.Array) -> jax.Array:
    """Every member's query vectors, `[E, Q, d_corpus]` (inference: no dropout)."""
    return jax.vmap(lambda member: head.apply({"params": member}, queries))(params)


def make_train_step(head: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    config: Config, mesh: Mesh) -> Callable:
    """Builds `train_step(state, batch, corpus) -> (state, metrics)`; jit it, donating the state.

    `corpus` is the `(embeddings, mask)` pair of a `ShardedCorpus` on `mesh`: rows split over the `corpus` axis,
    the mask marking the documents the full-corpus softmax contrasts against. The batch is split over `data`.
    With `train.micro_batch_size`, the global batch is processed in micro-batches whose gradients are summed,
    so a batch of any size runs in bounded memory with the result of one big batch. Config values are closed
    over as constants, so they are compiled in rather than traced; metrics are per member, `[E]`.
    """
    loss_config, batch_size = config.loss, config.train.batch_size
    num_micro = batch_size // (config.train.micro_batch_size or batch_size)
    data_size = mesh.shape[DATA]
    seed_key = jax.random.key(config.train.seed)
    values = {name: np.asarray(v, np.float32) for name, v in member_values(config).items()}
    members = config.ensemble.members
    # Temperatures differ per member, so queries are divided by them before a loss built with τ = 1.
    corpus_loss = make_corpus_softmax_loss(mesh, temperature=1.0, z_loss=loss_config.z_loss,
                                           chunk=config.train.corpus_chunk)

    def summed_loss(params, batch, corpus, key):
        """Per-member sums over the (micro-)batch; the caller divides by the global batch size."""
        queries, positive_ids, positive_weights = batch["queries"], batch["positive_ids"], batch["positive_weights"]
        member_keys = jax.random.split(jax.random.fold_in(key, 0), members)

        def forward(member_params, member_key, dropout_rate):
            return head.apply({"params": member_params}, queries, train=True, dropout_rate=dropout_rate,
                              rngs={"dropout": member_key})

        vectors = jax.vmap(forward)(params, member_keys, values["dropout"])  # [E, B, d]
        scaled = vectors / values["temperature"][:, None, None]
        if loss_config.kind == "full_corpus":
            per_query = corpus_loss(scaled, corpus, positive_ids, positive_weights)
        else:
            sampled = sample_positive(jax.random.fold_in(key, 1), positive_ids, positive_weights)
            per_query = jax.vmap(lambda v: in_batch_softmax_loss(v, corpus[0][sampled], sampled, positive_ids,
                                                                 positive_weights, 1.0))(scaled)
        task = per_query.sum(axis=1)
        recovery = recovery_penalty(vectors, base_projection(queries, vectors.shape[-1])).sum(axis=1)
        return (task + values["recovery_weight"] * recovery).sum(), (task, recovery)

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

        zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros((members,)), jnp.zeros((members,))))
        total, _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(num_micro)))
        return total

    def member_update(grads, opt_state, params, learning_rate, weight_decay, stopped):
        direction, new_opt_state = optimizer.update(grads, opt_state, params)
        updated = jax.tree.map(lambda p, u: p - learning_rate * (u + weight_decay * p), params, direction)

        def keep(new, old):  # a stopped member stays exactly as it is
            return jnp.where(stopped, old, new)

        return (jax.tree.map(keep, updated, params), jax.tree.map(keep, new_opt_state, opt_state),
                optax.tree.norm(grads))

    def train_step(state: TrainState, batch: dict, corpus: tuple[jax.Array, jax.Array]):
        key = jax.random.fold_in(seed_key, state.step)
        if num_micro == 1:
            grads, (task, recovery) = summed_grad(state.params, batch, corpus, key)
        else:
            grads, (task, recovery) = micro_batched_grad(state.params, batch, corpus, key)
        grads = jax.tree.map(lambda g: g / batch_size, grads)
        task, recovery = task / batch_size, recovery / batch_size
        learning_rate = schedule(state.step) * values["learning_rate"]
        params, opt_state, grad_norm = jax.vmap(member_update)(
            grads, state.opt_state, state.params, learning_rate, values["weight_decay"], state.stopped)
        metrics = {"loss": task + values["recovery_weight"] * recovery, "task_loss": task, "recovery": recovery,
                   "grad_norm": grad_norm, "learning_rate": learning_rate}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
