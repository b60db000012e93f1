"""The recovery regulariser `loss.recovery_weight · ‖f(q) − E q‖²`: the head departs from the base retrieval
only as far as the data asks (per member: `ensemble.recovery_weight`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.heads.base import base_projection
from esep_jax.objectives.registry import Term, TermInputs, register_term


def recovery_penalty(query_vectors: jax.Array, base_vectors: jax.Array) -> jax.Array:
    """`‖f(q) − E q‖²` per query: how far the head moved each query from the base retrieval."""
    return jnp.sum(jnp.square(query_vectors - base_vectors), axis=-1)


class Recovery(Term):
    name = "recovery"
    order = 9

    def weights(self, member_values):
        return np.asarray(member_values["recovery_weight"], np.float32)

    def __call__(self, inputs: TermInputs) -> jax.Array:
        base = base_projection(inputs.batch["queries"], inputs.vectors.shape[-1])
        return recovery_penalty(inputs.vectors, base).sum(axis=1)


@register_term("recovery")
def _factory(config, dataset):
    # Always reported (it measures how far the head moved); a zero weight makes it a metric only.
    return Recovery()
