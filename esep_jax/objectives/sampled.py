"""`loss.kind=sampled`: a softmax over each query's own candidates — its positives, mined hard negatives and
log-Q-corrected uniform draws, gathered with their vectors on the host (`data/signals.py`), so the device never
holds the corpus: the task loss for corpora larger than device memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esep_jax.objectives import matryoshka
from esep_jax.objectives.registry import Term, TermInputs, register_term


def candidate_softmax_loss(query_vectors: jax.Array, candidate_vectors: jax.Array, bias: jax.Array,
                           mask: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of a softmax over each query's own candidates `[B, C, d]` (per query).

    `bias` is added to the logits (the log-Q correction of sampled slots), `mask` drops padding and duplicate
    slots, `targets [B, C]` is the normalised target distribution, non-zero only on positive slots.
    `query_vectors` are already divided by the temperature.
    """
    logits = jnp.einsum("bd,bcd->bc", query_vectors, candidate_vectors.astype(query_vectors.dtype)) + bias
    logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(targets > 0, targets * logits, 0.0).sum(axis=-1)


class SampledSoftmax(Term):
    name = "task_loss"
    order = 0
    signals = frozenset({"sampled_candidates"})

    def __init__(self, task_weight: float):
        self.task_weight = task_weight

    def weights(self, member_values):
        return super().weights(member_values) * self.task_weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        batch = inputs.batch
        return jax.vmap(lambda v: candidate_softmax_loss(
            v, batch["candidate_vectors"], batch["candidate_bias"], batch["candidate_mask"],
            batch["candidate_targets"]))(inputs.scaled).sum(axis=1)


@register_term("sampled")
def _factory(config, dataset):
    if config.loss.kind != "sampled" or config.loss.task_weight <= 0:
        return None
    return matryoshka.wrap(SampledSoftmax(config.loss.task_weight), config.loss.matryoshka_dims)
