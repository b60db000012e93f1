"""Teacher distillation (`loss.teacher`): `teacher_weight · KL(p_teacher ‖ p_head)` over each query's teacher
candidates, imported with `esep-jax teacher` and gathered with their vectors on the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esep_jax.objectives.registry import Term, TermInputs, register_term


def teacher_kl_loss(query_vectors: jax.Array, candidate_vectors: jax.Array, teacher_scores: jax.Array,
                    mask: jax.Array, teacher_temperature: float) -> jax.Array:
    """`KL(p_teacher ‖ p_head)` over each query's candidates (per query); 0 for a query without candidates.

    `p_teacher = softmax(scores / teacher_temperature)`, `p_head = softmax(<f(q), c>)` with `query_vectors`
    already divided by the head's temperature.
    """
    has_any = mask.any(axis=-1)
    safe_mask = mask | ~has_any[:, None]  # a row without candidates computes on dummies, then is zeroed
    student = jnp.einsum("bd,bcd->bc", query_vectors, candidate_vectors.astype(query_vectors.dtype))
    log_student = jax.nn.log_softmax(jnp.where(safe_mask, student, -jnp.inf), axis=-1)
    log_teacher = jax.nn.log_softmax(jnp.where(safe_mask, teacher_scores / teacher_temperature, -jnp.inf), axis=-1)
    terms = jnp.where(safe_mask, jnp.exp(log_teacher) * (log_teacher - log_student), 0.0)
    return jnp.where(has_any, terms.sum(axis=-1), 0.0)


class TeacherKL(Term):
    name = "teacher_kl"
    order = 1
    signals = frozenset({"teacher_candidates"})

    def __init__(self, weight: float, temperature: float):
        self.weight, self.temperature = weight, temperature

    def weights(self, member_values):
        return super().weights(member_values) * self.weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        batch = inputs.batch
        return jax.vmap(lambda v: teacher_kl_loss(v, batch["teacher_vectors"], batch["teacher_scores"],
                                                  batch["teacher_mask"], self.temperature))(inputs.scaled).sum(axis=1)


@register_term("teacher")
def _factory(config, dataset):
    if not config.loss.teacher:
        return None
    return TeacherKL(config.loss.teacher_weight, config.loss.teacher_temperature)
