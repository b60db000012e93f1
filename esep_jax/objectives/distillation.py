"""Distillation onto target vectors (`loss.distill`, query drift): `‖f(q_B) − q_A‖²` (or 1 − cosine) over the
training queries' targets (`queries/targets`) and over the paired texts, whichever the dataset holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esep_jax.errors import InputError
from esep_jax.objectives.registry import Term, TermInputs, register_term

PAIRED_SALT = 2  # key salt of the head's pass over the paired texts (shared with the listwise term)


def distillation_loss(vectors: jax.Array, targets: jax.Array, kind: str) -> jax.Array:
    """Per-row distance of mapped vectors to target vectors: `mse` = ‖v − t‖², `cosine` = 1 − cos(v, t)."""
    if kind == "mse":
        return jnp.sum(jnp.square(vectors - targets), axis=-1)
    if kind == "cosine":
        dot = jnp.sum(vectors * targets, axis=-1)
        norms = jnp.linalg.norm(vectors, axis=-1) * jnp.linalg.norm(targets, axis=-1)
        return 1.0 - dot / jnp.maximum(norms, 1e-12)
    raise ValueError(f"unknown distillation kind {kind!r}")


class Distillation(Term):
    name = "distill"
    order = 2

    def __init__(self, kind: str, weight: float, query_targets: bool, paired: bool):
        self.kind, self.weight = kind, weight
        self.signals = frozenset({"query_targets"} if query_targets else set()) | frozenset(
            {"paired_texts"} if paired else set())

    def weights(self, member_values):
        return super().weights(member_values) * self.weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        batch, total = inputs.batch, 0.0
        if "query_targets" in self.signals:
            total += distillation_loss(inputs.vectors, batch["target_vectors"][None], self.kind).sum(axis=1)
        if "paired_texts" in self.signals:
            mapped = inputs.forward(batch["paired_source"], PAIRED_SALT)
            total += distillation_loss(mapped, batch["paired_target"][None], self.kind).sum(axis=1)
        return total


@register_term("distillation")
def _factory(config, dataset):
    if not config.loss.distill:
        return None
    targets = dataset is not None and dataset.has_query_targets
    paired = dataset is not None and dataset.num_paired > 0
    if not (targets or paired):
        raise InputError("loss.distill needs target vectors: ingest with --query-targets and/or "
                         "--paired-source/--paired-target", file=None if dataset is None else dataset.location,
                         field="config.loss.distill")
    return Distillation(config.loss.distill, config.loss.distill_weight, targets, paired)
