"""`lowrank`: `f(q) = E q + U Vᵀ q` — V random, U zero-initialised, so only a rank-r update is learnt."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from esep_jax.heads.base import base_projection, float64_params, rectangular_identity, weighted_sum
from esep_jax.heads.registry import HeadSpec, register


class LowRankHead(nn.Module):
    output_dim: int
    rank: int

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        down = nn.Dense(self.rank, use_bias=False, name="down", kernel_init=nn.initializers.orthogonal())(queries)
        up = nn.Dense(self.output_dim, use_bias=False, kernel_init=nn.initializers.zeros, name="up")(down)
        return base_projection(queries, self.output_dim) + up


def fold(member_params: dict, weights: np.ndarray, input_dim: int, output_dim: int):
    """Each member's `V U` is a `[d_in, d_out]` matrix, so members fold to one bundle `linear` head."""
    p = float64_params(member_params)
    products = np.einsum("mir,mro->mio", p["down"]["kernel"], p["up"]["kernel"])
    return {"kind": "linear"}, {"W": rectangular_identity(input_dim, output_dim) + weighted_sum(weights, products)}


SPEC = register(HeadSpec("lowrank", build=lambda config, dim: LowRankHead(dim, config.rank), fold=fold))
