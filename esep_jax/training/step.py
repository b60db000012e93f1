"""The pure train step `(state, batch, tables) -> (state, metrics)` for an ensemble of heads.

The loss is the weighted sum of the active terms (`esep_jax/objectives/`); each member's hyperparameters
(learning rate, weight decay, temperature, recovery weight, dropout) are constants closed over by the step, so
one compiled program trains members that differ. Keys are `fold_in(seed_key, step)` inside the step; no key is
stored or returned. `tables` are the device-resident arrays the terms asked for (the corpus, the paired
texts), placed once and passed to every call.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from esep_jax.config import Config, member_values
from esep_jax.objectives import Term, TermInputs
from esep_jax.objectives.corpus_softmax import DATA
from esep_jax.runs.state import TrainState


def make_train_step(head: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    config: Config, mesh: Mesh, terms: list[Term]) -> Callable:
    """Builds `train_step(state, batch, tables) -> (state, metrics)`; jit it, donating the state.

    The batch is split over the mesh's `data` axis. With `train.micro_batch_size`, the global batch is processed
    in micro-batches whose gradients are summed, so a batch of any size runs in bounded memory with the result
    of one big batch. Metrics are per member, `[E]`: every term's mean over the batch, the total `loss`, the
    gradient norm, the learning rate, and `nonfinite_params` (1 if any updated parameter is NaN or Inf).
    """
    batch_size = config.train.batch_size
    num_micro = batch_size // (config.train.micro_batch_size or batch_size)
    data_size = mesh.shape[DATA]
    seed_key = jax.random.key(config.train.seed)
    values = {name: np.asarray(v, np.float32) for name, v in member_values(config).items()}
    members = config.ensemble.members
    term_weights = [term.weights(member_values(config)) for term in terms]
    term_names = [term.name for term in terms] + ["loss"]

    def summed_loss(params, batch, tables, key):
        """Per-member sums over the (micro-)batch; the caller divides by the global batch size."""
        cache: dict = {}

        def forward(inputs, salt: int):
            """Every member's head in train mode (dropout keyed by `salt`) on `inputs`, memoised per call."""
            memo = (id(inputs), salt)
            if memo not in cache:
                member_keys = jax.random.split(jax.random.fold_in(key, salt), members)
                cache[memo] = jax.vmap(lambda p, k, rate: head.apply(
                    {"params": p}, inputs, train=True, dropout_rate=rate, rngs={"dropout": k}),
                    in_axes=(0, 0, 0))(params, member_keys, values["dropout"])
            return cache[memo]

        inputs = TermInputs(vectors=forward(batch["queries"], 0), temperatures=jnp.asarray(values["temperature"]),
                            batch=batch, tables=tables, key=key, forward=forward, mesh=mesh)
        sums = {}
        total = jnp.zeros((members,), jnp.float32)
        for term, weight in zip(terms, term_weights):
            sums[term.name] = term(inputs)
            total = total + weight * sums[term.name]
        sums["loss"] = total
        return total.sum(), sums

    summed_grad = jax.grad(summed_loss, has_aux=True)

    def micro_batched_grad(params, batch, tables, key):
        # Micro-batch m takes rows m·b_local … (m+1)·b_local − 1 of *every* data shard, so each micro-batch
        # stays spread over all devices and the reshape moves no data between them.
        def split(values):
            local = values.reshape(data_size, num_micro, -1, *values.shape[1:])
            return jnp.swapaxes(local, 0, 1).reshape(num_micro, -1, *values.shape[1:])

        def accumulate(total, micro_and_index):
            micro_batch, index = micro_and_index
            grads, sums = summed_grad(params, micro_batch, tables, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {name: jnp.zeros((members,)) for name in term_names})
        total, _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(num_micro)))
        return total

    def member_update(grads, opt_state, params, learning_rate, weight_decay, stopped):
        direction, new_opt_state = optimizer.update(grads, opt_state, params)
        updated = jax.tree.map(lambda p, u: p - learning_rate * (u + weight_decay * p), params, direction)

        def keep(new, old):  # a stopped member stays exactly as it is
            return jnp.where(stopped, old, new)

        finite = jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(updated)]))
        return (jax.tree.map(keep, updated, params), jax.tree.map(keep, new_opt_state, opt_state),
                optax.tree.norm(grads), finite)

    def train_step(state: TrainState, batch: dict, tables: dict):
        key = jax.random.fold_in(seed_key, state.step)
        if num_micro == 1:
            grads, sums = summed_grad(state.params, batch, tables, key)
        else:
            grads, sums = micro_batched_grad(state.params, batch, tables, key)
        grads = jax.tree.map(lambda g: g / batch_size, grads)
        learning_rate = schedule(state.step) * values["learning_rate"]
        params, opt_state, grad_norm, finite = jax.vmap(member_update)(
            grads, state.opt_state, state.params, learning_rate, values["weight_decay"], state.stopped)
        metrics = {name: value / batch_size for name, value in sums.items()}
        metrics.update(grad_norm=grad_norm, learning_rate=learning_rate,
                       nonfinite_params=1.0 - finite.astype(jnp.float32))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
