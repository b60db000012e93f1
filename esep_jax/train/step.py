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

from esep_jax.config import Config, OptimConfig, matryoshka_dims, member_values
from esep_jax.corpus_softmax import DATA, make_corpus_softmax_loss
from esep_jax.losses import (candidate_softmax_loss, distillation_loss, in_batch_softmax_loss,
                             listwise_distillation_loss, prefix_queries, recovery_penalty, sample_positive,
                             teacher_kl_loss)
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
    """Builds `train_step(state, batch, corpus, paired=None) -> (state, metrics)`; jit it, donating the state.

    `corpus` is the `(embeddings, mask)` pair of a `ShardedCorpus` on `mesh`: rows split over the `corpus` axis,
    the mask marking the documents the full-corpus softmax contrasts against (with `loss.matryoshka_dims`,
    the rows are `losses.prefix_corpus` of the embeddings, as are sampled candidates). `paired` is the
    `(source [M, d_q], target [M, d_c])` pair of every paired text, replicated, for `loss.listwise_weight`
    (B's scores of the sources teach the head's scores of the targets). The batch is split over `data`.
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
    listwise = loss_config.listwise_weight > 0
    active_terms = {"loss", "task_loss", "recovery"} | ({"teacher_kl"} if loss_config.teacher else set()) | (
        {"distill"} if loss_config.distill else set()) | ({"listwise"} if listwise else set())
    term_names = ("task_loss", "teacher_kl", "distill", "listwise", "recovery", "loss")
    listwise_from = {"train": ("queries",), "paired": ("paired_source",),
                     "both": ("queries", "paired_source")}[loss_config.listwise_queries]
    # Temperatures differ per member, so queries are divided by them before a loss built with τ = 1.
    corpus_loss = make_corpus_softmax_loss(mesh, temperature=1.0, z_loss=loss_config.z_loss,
                                           chunk=config.train.corpus_chunk)
    prefixes = matryoshka_dims(config)

    def retrieval_loss(scaled, batch, corpus, key):
        """The task loss per member and query, `[E, B]`, for temperature-scaled vectors `[E, B, d]`."""
        if loss_config.kind == "full_corpus":
            return corpus_loss(scaled, corpus, batch["positive_ids"], batch["positive_weights"])
        if loss_config.kind == "sampled":
            return jax.vmap(lambda v: candidate_softmax_loss(
                v, batch["candidate_vectors"], batch["candidate_bias"], batch["candidate_mask"],
                batch["candidate_targets"]))(scaled)
        positive_ids, positive_weights = batch["positive_ids"], batch["positive_weights"]
        sampled = sample_positive(jax.random.fold_in(key, 1), positive_ids, positive_weights)
        return jax.vmap(lambda v: in_batch_softmax_loss(v, corpus[0][sampled], sampled, positive_ids,
                                                        positive_weights, 1.0))(scaled)

    def matryoshka_loss(scaled, batch, corpus, key):
        """The task loss averaged over prefix sizes. The corpus (or the candidates) is `prefix_corpus`, so each
        prefix is one more "member" of the same pass over it."""
        stacked = prefix_queries(scaled, prefixes)  # [P, E, B, D]
        folded = stacked.reshape(-1, *stacked.shape[2:])
        return retrieval_loss(folded, batch, corpus, key).reshape(stacked.shape[0], members, -1).mean(axis=0)

    task_loss = matryoshka_loss if prefixes else retrieval_loss

    def summed_loss(params, batch, corpus, paired, key):
        """Per-member sums over the (micro-)batch; the caller divides by the global batch size."""
        queries = batch["queries"]
        member_keys = jax.random.split(jax.random.fold_in(key, 0), members)

        def forward(member_params, member_key, dropout_rate, inputs):
            return head.apply({"params": member_params}, inputs, train=True, dropout_rate=dropout_rate,
                              rngs={"dropout": member_key})

        vectors = jax.vmap(forward, in_axes=(0, 0, 0, None))(params, member_keys, values["dropout"], queries)
        scaled = vectors / values["temperature"][:, None, None]
        zeros = jnp.zeros((members,), jnp.float32)
        terms = {"task_loss": zeros, "teacher_kl": zeros, "distill": zeros, "listwise": zeros}
        if loss_config.task_weight > 0:
            terms["task_loss"] = task_loss(scaled, batch, corpus, key).sum(axis=1)
        if loss_config.teacher:
            terms["teacher_kl"] = jax.vmap(lambda v: teacher_kl_loss(
                v, batch["teacher_vectors"], batch["teacher_scores"], batch["teacher_mask"],
                loss_config.teacher_temperature))(scaled).sum(axis=1)
        mapped = None  # the head applied to the batch's paired texts, when a loss needs it
        if "paired_source" in batch:
            mapped = jax.vmap(forward, in_axes=(0, 0, 0, None))(
                params, jax.random.split(jax.random.fold_in(key, 2), members), values["dropout"],
                batch["paired_source"])
        if loss_config.distill:
            if "target_vectors" in batch:
                terms["distill"] += distillation_loss(vectors, batch["target_vectors"][None],
                                                      loss_config.distill).sum(axis=1)
            if mapped is not None:
                terms["distill"] += distillation_loss(mapped, batch["paired_target"][None],
                                                      loss_config.distill).sum(axis=1)
        if listwise:
            if paired is None:
                raise ValueError("loss.listwise_weight needs the paired texts: pass train_step(..., paired=...)")
            sources, targets = paired
            outputs = {"queries": vectors, "paired_source": mapped}
            for name in listwise_from:
                teacher_logits = jnp.einsum("bd,md->bm", batch[name], sources.astype(batch[name].dtype)) / (
                    loss_config.listwise_temperature)
                scaled_outputs = outputs[name] / values["temperature"][:, None, None]
                terms["listwise"] += jax.vmap(lambda v: listwise_distillation_loss(v, teacher_logits, targets))(
                    scaled_outputs).sum(axis=1)
        terms["recovery"] = recovery_penalty(vectors, base_projection(queries, vectors.shape[-1])).sum(axis=1)
        total = (loss_config.task_weight * terms["task_loss"] + loss_config.teacher_weight * terms["teacher_kl"]
                 + loss_config.distill_weight * terms["distill"] + loss_config.listwise_weight * terms["listwise"]
                 + values["recovery_weight"] * terms["recovery"])
        terms["loss"] = total
        return total.sum(), terms

    summed_grad = jax.grad(summed_loss, has_aux=True)

    def micro_batched_grad(params, batch, corpus, paired, key):
        # Micro-batch m takes rows m·b_local … (m+1)·b_local − 1 of *every* data shard, so each micro-batch
        # stays spread over all devices and the reshape moves no data between them.
        def split(values):
            local = values.reshape(data_size, num_micro, -1, *values.shape[1:])
            return jnp.swapaxes(local, 0, 1).reshape(num_micro, -1, *values.shape[1:])

        def accumulate(total, micro_and_index):
            micro_batch, index = micro_and_index
            grads, sums = summed_grad(params, micro_batch, corpus, paired, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {name: jnp.zeros((members,)) for name in term_names})
        total, _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(num_micro)))
        return total

    def member_update(grads, opt_state, params, learning_rate, weight_decay, stopped):
        direction, new_opt_state = optimizer.update(grads, opt_state, params)
        updated = jax.tree.map(lambda p, u: p - learning_rate * (u + weight_decay * p), params, direction)

        def keep(new, old):  # a stopped member stays exactly as it is
            return jnp.where(stopped, old, new)

        return (jax.tree.map(keep, updated, params), jax.tree.map(keep, new_opt_state, opt_state),
                optax.tree.norm(grads))

    def train_step(state: TrainState, batch: dict, corpus: tuple[jax.Array, jax.Array],
                   paired: tuple[jax.Array, jax.Array] | None = None):
        key = jax.random.fold_in(seed_key, state.step)
        if num_micro == 1:
            grads, terms = summed_grad(state.params, batch, corpus, paired, key)
        else:
            grads, terms = micro_batched_grad(state.params, batch, corpus, paired, key)
        grads = jax.tree.map(lambda g: g / batch_size, grads)
        learning_rate = schedule(state.step) * values["learning_rate"]
        params, opt_state, grad_norm = jax.vmap(member_update)(
            grads, state.opt_state, state.params, learning_rate, values["weight_decay"], state.stopped)
        metrics = {name: value / batch_size for name, value in terms.items() if name in active_terms}
        metrics.update(grad_norm=grad_norm, learning_rate=learning_rate)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
