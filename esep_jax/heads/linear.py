"""`linear`: `f(q) = (E + D) q [+ b]` with D (and b) zero-initialised — a full linear map from the identity."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from esep_jax.heads.base import base_projection, float64_params, rectangular_identity, weighted_sum
from esep_jax.heads.registry import HeadSpec, register


class LinearHead(nn.Module):
    output_dim: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        residual = nn.Dense(self.output_dim, kernel_init=nn.initializers.zeros, use_bias=self.use_bias,
                            name="residual")(queries)
        return base_projection(queries, self.output_dim) + residual


def fold(member_params: dict, weights: np.ndarray, input_dim: int, output_dim: int):
    """Members fold to one matrix: `W = E + Σ_m w_m D_m`, `b = Σ_m w_m b_m` (a bundle `linear` head)."""
    p = float64_params(member_params)["residual"]
    tensors = {"W": rectangular_identity(input_dim, output_dim) + weighted_sum(weights, p["kernel"])}
    if "bias" in p:
        tensors["b"] = weighted_sum(weights, p["bias"])
    return {"kind": "linear"}, tensors


SPEC = register(HeadSpec("linear", build=lambda config, dim: LinearHead(dim, config.use_bias), fold=fold))
