"""Listwise distillation over the whole corpus from A's own query vectors (`loss.corpus_listwise_weight`; query
drift where the dataset holds `queries/targets`, A's embedding of each training query).

The teacher is how A ranks A's index for the query, `p_t = softmax(<q_A, c_j>/τ_t + b_j)`; the student is the
head, `p_s = softmax(<f(q_B), c_j>/τ + b_j)`, over the same rows (b the corpus table's bias: padding and
`loss.negatives=judged` exclusions apply to both). Unlike the listwise term over the paired texts, this needs
no document encoded by both models: A's query embeddings are cheap (queries are short), so the signal covers the
whole index however few paired texts there are. Where B is the stronger encoder it is a floor, not a ceiling —
the task loss then moves the head beyond A's ranking.

With u = f(q_B)/τ and t = q_A/τ_t (the bias cancels):

    KL(p_t ‖ p_s) = <t − u, E_t[c]> − LSE_t + LSE_s,        ∂KL/∂u = E_s[c] − E_t[c],

so one scan of `corpus_softmax.corpus_softmax_summaries` over the teacher's and every member's rows together gives
both normalisers and both expected rows — the forward pass holds the gradient, as in the task loss; no `[B, N]`
matrix exists and the corpus is read once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from esep_jax.errors import InputError
from esep_jax.objectives.corpus_softmax import CORPUS as CORPUS_AXIS, DATA, corpus_softmax_summaries
from esep_jax.objectives.registry import CORPUS, Term, TermInputs, register_term


def _forward_shard(students, teacher, corpus, bias, *, chunk):
    """Per device: KL per (member, row) `[E, b]` and its gradient with respect to `students [E, b, d]`."""
    members, rows, dim = students.shape
    teacher = teacher.astype(jnp.float32)
    scaled = students.astype(jnp.float32)
    log_normaliser, expected = corpus_softmax_summaries(
        jnp.concatenate([teacher, scaled.reshape(members * rows, dim)]), corpus, bias, chunk)
    teacher_lse, teacher_row = log_normaliser[:rows], expected[:rows]
    student_lse = log_normaliser[rows:].reshape(members, rows)
    student_row = expected[rows:].reshape(members, rows, dim)
    kl = jnp.einsum("ebd,bd->eb", teacher[None] - scaled, teacher_row) - teacher_lse[None] + student_lse
    return kl, student_row - teacher_row[None]


def make_corpus_listwise_loss(mesh, chunk: int = 8192):
    """Builds `loss(students [E, B, d], teacher [B, d], corpus, bias) -> KL [E, B]`, both sides already divided
    by their temperatures; a custom VJP reuses the gradient the forward pass computed (none flows to the
    teacher, which is data)."""

    def sharded_forward(students, teacher, corpus, bias):
        shard = functools.partial(_forward_shard, chunk=chunk)
        return jax.shard_map(shard, mesh=mesh, in_specs=(P(None, DATA), P(DATA), P(CORPUS_AXIS), P(CORPUS_AXIS)),
                             out_specs=(P(None, DATA), P(None, DATA)))(students, teacher, corpus, bias)

    @jax.custom_vjp
    def loss(students, teacher, corpus, bias):
        return sharded_forward(students, teacher, corpus, bias)[0]

    def loss_forward(students, teacher, corpus, bias):
        return sharded_forward(students, teacher, corpus, bias)

    def loss_backward(gradient, cotangent):
        return (cotangent[..., None] * gradient, None, None, None)

    loss.defvjp(loss_forward, loss_backward)
    return loss


def corpus_listwise_reference(students, teacher, corpus, bias):
    """The plain `[B, N]` version of the loss (tests): `KL(softmax(t·C + b) ‖ softmax(u·C + b))` per row."""
    log_teacher = jax.nn.log_softmax(teacher @ corpus.T + bias, axis=-1)
    log_student = jax.nn.log_softmax(jnp.einsum("ebd,nd->ebn", students, corpus) + bias, axis=-1)
    weights = jnp.exp(log_teacher)[None]
    return jnp.where(weights > 0, weights * (log_teacher[None] - log_student), 0.0).sum(axis=-1)


class CorpusListwise(Term):
    name = "corpus_listwise"
    order = 3
    signals = frozenset({"query_targets"})
    tables = frozenset({CORPUS})

    def __init__(self, weight: float, temperature: float, chunk: int):
        self.weight, self.temperature, self.chunk = weight, temperature, chunk

    def weights(self, member_values):
        return super().weights(member_values) * self.weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        corpus, bias = inputs.tables[CORPUS]
        teacher = inputs.batch["target_vectors"] / self.temperature
        loss = make_corpus_listwise_loss(inputs.mesh, self.chunk)
        return loss(inputs.scaled, teacher, corpus, bias).sum(axis=1)


@register_term("corpus_listwise")
def _factory(config, dataset):
    loss = config.loss
    if loss.corpus_listwise_weight <= 0:
        return None
    if loss.kind != "full_corpus":
        raise InputError("loss.corpus_listwise_weight needs loss.kind=full_corpus (it scans the placed corpus)",
                         field="config.loss.corpus_listwise_weight")
    if loss.matryoshka_dims:  # the task table then holds prefix blocks side by side, not A's index
        raise InputError("loss.corpus_listwise_weight cannot be combined with loss.matryoshka_dims",
                         field="config.loss.corpus_listwise_weight")
    if dataset is None or not dataset.has_query_targets:
        raise InputError("loss.corpus_listwise_weight needs A's embedding of each query: ingest with "
                         "--query-targets", file=None if dataset is None else dataset.location,
                         field="config.loss.corpus_listwise_weight")
    return CorpusListwise(loss.corpus_listwise_weight, loss.corpus_listwise_temperature, config.train.corpus_chunk)
