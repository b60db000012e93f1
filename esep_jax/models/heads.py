"""Searching modules: small query-side heads `f` with score `<f(q), d>`.

Every head is `f(q) = E q + r(q)`, where `E` is a fixed identity (or rectangular identity when the query and
corpus dimensions differ) and the residual `r` starts at exactly zero. So an untrained head reproduces the
base retrieval bit for bit, weight decay shrinks the head towards the identity rather than towards zero, and
the recovery regulariser `‖f(q) − E q‖²` is simply `‖r(q)‖²`.

Linen modules keep parameters as plain pytrees at the jit boundary, which is what vmap-ed ensembles,
shard_map and orbax all want.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from esep_jax.config import ModelConfig


def base_projection(queries: jax.Array, output_dim: int) -> jax.Array:
    """`E q`: the query itself, truncated or zero-padded to the corpus dimension."""
    input_dim = queries.shape[-1]
    if input_dim == output_dim:
        return queries
    if input_dim > output_dim:
        return queries[..., :output_dim]
    return jnp.pad(queries, [(0, 0)] * (queries.ndim - 1) + [(0, output_dim - input_dim)])


class LinearHead(nn.Module):
    """`f(q) = (E + D) q [+ b]` with D (and b) zero-initialised: a full linear map starting at the identity."""

    output_dim: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        residual = nn.Dense(self.output_dim, kernel_init=nn.initializers.zeros, use_bias=self.use_bias,
                            name="residual")(queries)
        return base_projection(queries, self.output_dim) + residual


class LowRankHead(nn.Module):
    """`f(q) = E q + U Vᵀ q`: U zero-initialised, V random, so only U Vᵀ (rank r) is learnt."""

    output_dim: int
    rank: int

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        down = nn.Dense(self.rank, use_bias=False, name="down",
                        kernel_init=nn.initializers.orthogonal())(queries)
        up = nn.Dense(self.output_dim, use_bias=False, kernel_init=nn.initializers.zeros, name="up")(down)
        return base_projection(queries, self.output_dim) + up


class ResidualMLPHead(nn.Module):
    """`f(q) = E q + W₂ gelu(W₁ q + b₁) [+ b₂]` with the output layer zero-initialised."""

    output_dim: int
    hidden_dim: int
    dropout: float = 0.0
    use_bias: bool = False

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        hidden = nn.gelu(nn.Dense(self.hidden_dim, name="hidden")(queries))
        if train:
            # The rate may be traced (one per ensemble member), so dropout is written out rather than nn.Dropout.
            rate = self.dropout if dropout_rate is None else dropout_rate
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, hidden.shape)
            hidden = jnp.where(keep, hidden / (1.0 - rate), 0.0)
        out = nn.Dense(self.output_dim, kernel_init=nn.initializers.zeros, use_bias=self.use_bias,
                       name="out")(hidden)
        return base_projection(queries, self.output_dim) + out


def build_head(config: ModelConfig, output_dim: int) -> nn.Module:
    """The head the config names, producing vectors of the corpus dimension."""
    if config.head == "linear":
        return LinearHead(output_dim, config.use_bias)
    if config.head == "lowrank":
        return LowRankHead(output_dim, config.rank)
    if config.head == "mlp":
        return ResidualMLPHead(output_dim, config.hidden_dim, config.dropout, config.use_bias)
    raise ValueError(f"unknown head {config.head!r}")


def init_params(head: nn.Module, key: jax.Array, query_dim: int):
    """Parameters of `head` for queries of `query_dim`."""
    return head.init(key, jnp.zeros((1, query_dim), jnp.float32))["params"]
