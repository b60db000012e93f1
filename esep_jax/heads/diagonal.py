"""`diagonal`: `f(q) = (1 + s) ⊙ E q [+ b]` with s (and b) zero-initialised — a learnt weight per dimension.

The smallest head that still re-weights what the encoder's coordinates count for: d parameters instead of
d², so it can hardly memorise a document prior, at the price of expressing no rotation. It folds into a
bundle's `linear` head (a diagonal `W`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.heads.base import base_projection, float64_params, rectangular_identity, weighted_sum
from esep_jax.heads.registry import HeadSpec, register


class DiagonalHead(nn.Module):
    output_dim: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, queries: jax.Array, train: bool = False, dropout_rate=None) -> jax.Array:
        base = base_projection(queries, self.output_dim)
        scale = self.param("scale", nn.initializers.zeros, (self.output_dim,), jnp.float32)
        out = base + base * scale
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.output_dim,), jnp.float32)
        return out


def fold(member_params: dict, weights: np.ndarray, input_dim: int, output_dim: int):
    """Members fold to `W = E · diag(1 + Σ_m w_m s_m)` and `b = Σ_m w_m b_m` (a bundle `linear` head)."""
    p = float64_params({"head": member_params})["head"]
    tensors = {"W": rectangular_identity(input_dim, output_dim) * (1.0 + weighted_sum(weights, p["scale"]))[None]}
    if "bias" in p:
        tensors["b"] = weighted_sum(weights, p["bias"])
    return {"kind": "linear"}, tensors


SPEC = register(HeadSpec("diagonal", build=lambda config, dim: DiagonalHead(dim, config.use_bias), fold=fold))
