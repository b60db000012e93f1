"""What every head shares: the fixed base map `E`, parameter initialisation, and applying an ensemble.

Every head is `f(q) = E q + r(q)`, where `E` is a fixed identity (or rectangular identity when the query and
corpus dimensions differ) and the residual `r` starts at exactly zero. So an untrained head reproduces the
base retrieval bit for bit, weight decay shrinks the head towards the identity rather than towards zero, and
the recovery regulariser `‖f(q) − E q‖²` is simply `‖r(q)‖²`. Linen modules keep parameters as plain pytrees
at the jit boundary, which is what vmap-ed ensembles, shard_map and orbax all want.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.heads.ensemble import combine


def base_projection(queries: jax.Array, output_dim: int) -> jax.Array:
    """`E q`: the query itself, truncated or zero-padded to the corpus dimension."""
    input_dim = queries.shape[-1]
    if input_dim == output_dim:
        return queries
    if input_dim > output_dim:
        return queries[..., :output_dim]
    return jnp.pad(queries, [(0, 0)] * (queries.ndim - 1) + [(0, output_dim - input_dim)])


def init_params(head: nn.Module, key: jax.Array, query_dim: int):
    """Parameters of `head` for queries of `query_dim`."""
    return head.init(key, jnp.zeros((1, query_dim), jnp.float32))["params"]


def apply_members(head: nn.Module, params, queries: jax.Array) -> jax.Array:
    """Every member's query vectors, `[E, Q, d_corpus]`, for params with a leading member axis (no dropout)."""
    return jax.vmap(lambda member: head.apply({"params": member}, queries))(params)


def query_transform(head: nn.Module, member_params, weights):
    """The combined head as one jitted function of query embeddings: `Σ_m w_m f_m(q)`."""
    weights = jnp.asarray(np.asarray(weights, np.float32))
    return jax.jit(lambda queries: combine(apply_members(head, member_params, queries), weights))


def rectangular_identity(input_dim: int, output_dim: int) -> np.ndarray:
    """`E` as a `[d_in, d_out]` float64 matrix (`q @ E` = `base_projection(q)`)."""
    return np.eye(input_dim, output_dim, dtype=np.float64)


def float64_params(member_params: dict) -> dict:
    """Parameters as float64 numpy, so a fold rounds to float32 once."""
    return {name: {key: np.asarray(value, np.float64) for key, value in layer.items()}
            for name, layer in member_params.items()}


def weighted_sum(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`Σ_m w_m values[m]` over the leading member axis."""
    return np.tensordot(np.asarray(weights, np.float64), values, axes=1)
