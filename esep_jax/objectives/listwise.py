"""Listwise distillation over the paired texts (`loss.listwise_weight`; query drift where B is the stronger
encoder): B's softmax over every paired text's B embedding, `softmax(<q_B, p_B> / τ_t)`, teaches the head's
softmax over their A embeddings, `softmax(<f(q_B), p_A> / τ)`, for the training queries and/or the paired texts
themselves as unlabelled pseudo-queries. It transfers how B ranks, not where A puts a query."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esep_jax.errors import InputError
from esep_jax.objectives.distillation import PAIRED_SALT
from esep_jax.objectives.registry import PAIRED, Term, TermInputs, register_term


def listwise_distillation_loss(scaled_vectors: jax.Array, teacher_logits: jax.Array,
                               student_documents: jax.Array) -> jax.Array:
    """`KL(softmax(teacher_logits) ‖ softmax(<v, d>))` per row over a shared list of documents `[M, d]`.

    `scaled_vectors [B, d]` are the head's vectors already divided by its temperature; `teacher_logits [B, M]`
    are the teacher's temperature-scaled scores of the same M documents (constant: no gradient flows into the
    teacher). The `[B, M]` logits are built whole; micro-batching bounds B.
    """
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
    student = jnp.einsum("bd,md->bm", scaled_vectors, student_documents.astype(scaled_vectors.dtype))
    log_student = jax.nn.log_softmax(student, axis=-1)
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


class Listwise(Term):
    name = "listwise"
    order = 3
    tables = frozenset({PAIRED})

    def __init__(self, weight: float, temperature: float, queries: str):
        self.weight, self.temperature = weight, temperature
        self.sources = {"train": ("queries",), "paired": ("paired_source",),
                        "both": ("queries", "paired_source")}[queries]
        self.signals = frozenset({"paired_texts"} if "paired_source" in self.sources else set())

    def weights(self, member_values):
        return super().weights(member_values) * self.weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        sources, targets = inputs.tables[PAIRED]
        total = 0.0
        for name in self.sources:
            rows = inputs.batch[name]
            teacher_logits = jnp.einsum("bd,md->bm", rows, sources.astype(rows.dtype)) / self.temperature
            outputs = inputs.vectors if name == "queries" else inputs.forward(rows, PAIRED_SALT)
            scaled = outputs / inputs.temperatures[:, None, None]
            total += jax.vmap(lambda v: listwise_distillation_loss(v, teacher_logits, targets))(scaled).sum(axis=1)
        return total


@register_term("listwise")
def _factory(config, dataset):
    loss = config.loss
    if loss.listwise_weight <= 0:
        return None
    if dataset is None or not dataset.num_paired:
        raise InputError("loss.listwise_weight needs paired texts: ingest with --paired-source/--paired-target",
                         file=None if dataset is None else dataset.location, field="config.loss.listwise_weight")
    return Listwise(loss.listwise_weight, loss.listwise_temperature, loss.listwise_queries)
