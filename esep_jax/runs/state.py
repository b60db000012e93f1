"""The train state a run's checkpoints hold, and how a fresh one is made.

Every run trains E ≥ 1 members at once: parameters and optimiser state carry a leading member axis, and the
state holds each member's early-stopping record (best parameters, dev score and step, evaluations since,
stopped), so a resumed run continues bit for bit. It lives with the run format, not the trainer, because
reading a run (`trained_run.py`) needs its structure as much as training does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from esep_jax.config import Config, OptimConfig
from esep_jax.heads import build_head, init_params


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


def run_components(config: Config, query_dim: int, corpus_dim: int):
    """(head module, optimizer, schedule, `() -> fresh TrainState`) of a config for data of these dims."""
    head = build_head(config.model, corpus_dim)
    optimizer, schedule = make_optimizer(config.optim, config.train.num_steps)

    def fresh_state() -> TrainState:
        return create_state(head, optimizer, config.train.seed, query_dim, config.ensemble.members)

    return head, optimizer, schedule, fresh_state
