"""`mlp`: `f(q) = E q + W₂ gelu(W₁ q + b₁) [+ b₂]` with the output layer zero-initialised."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.heads.base import base_projection, float64_params
from esep_jax.heads.registry import HeadSpec, register


class ResidualMLPHead(nn.Module):
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


def fold(member_params: dict, weights: np.ndarray, input_dim: int, output_dim: int):
    """MLP members do not fold into one matrix: the members with a non-zero weight are kept, stacked, with
    their weights (a bundle `mlp` head; gelu is flax's default tanh approximation)."""
    p = float64_params(member_params)
    weights = np.asarray(weights, np.float64)
    keep = np.flatnonzero(weights > 0)  # greedy selection may give members no weight: serve only the others
    head = {"kind": "mlp", "members": int(keep.size), "hidden_dim": int(p["hidden"]["kernel"].shape[-1]),
            "activation": "gelu_tanh", "base": "rectangular_identity"}
    tensors = {"member_weights": weights[keep], "hidden.kernel": p["hidden"]["kernel"][keep],
               "hidden.bias": p["hidden"]["bias"][keep], "out.kernel": p["out"]["kernel"][keep]}
    if "bias" in p["out"]:
        tensors["out.bias"] = p["out"]["bias"][keep]
    return head, tensors


SPEC = register(HeadSpec("mlp", fold=fold, build=lambda config, dim: ResidualMLPHead(
    dim, config.hidden_dim, config.dropout, config.use_bias)))
