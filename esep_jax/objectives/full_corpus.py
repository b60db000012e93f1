"""`loss.kind=full_corpus`: the exact softmax over the whole corpus against every positive of each query.

`loss_i = LSE_j(<f(q_i), c_j>/τ + b_j) − Σ_p w_ip (<f(q_i), c_p>/τ + b_p)`, computed blockwise and sharded by
`corpus_softmax.py`; `b` is the corpus table's logit bias (−inf for documents not contrasted against).
`full_corpus_softmax_loss` is the plain version that builds the `[B, N]` logits, the reference in tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.objectives import matryoshka
from esep_jax.objectives.corpus_softmax import make_corpus_softmax_loss
from esep_jax.objectives.registry import CORPUS, Term, TermInputs, register_term
from esep_jax.objectives.targets import target_distribution


def full_corpus_softmax_loss(query_vectors: jax.Array, corpus: jax.Array, positive_ids: jax.Array,
                             positive_weights: jax.Array, temperature: float,
                             document_mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of the softmax over the *whole* corpus against the multi-positive target (per query).

    With `document_mask` [N], only the masked-in documents enter the softmax (positives must be among them).
    """
    logits = jnp.einsum("bd,nd->bn", query_vectors, corpus.astype(query_vectors.dtype)) / temperature
    if document_mask is not None:
        logits = jnp.where(document_mask[None, :], logits, -jnp.inf)
    positive_logits = jnp.take_along_axis(logits, jnp.maximum(positive_ids, 0), axis=-1)
    targets = target_distribution(positive_ids, positive_weights)
    # `where`, not a product: padding may point at a masked-out (-inf) document.
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(targets > 0, targets * positive_logits, 0.0).sum(axis=-1)


def logit_adjustment(train_qrels, num_documents: int, strength: float, smoothing: float,
                     relevance_level: int = 1) -> np.ndarray:
    """`strength · log(π_j + smoothing / N)` per document (Menon et al., 2021), π_j the document's share of the
    training target mass (each training query spreads one unit over its positives, weighted by grade)."""
    query_of = np.repeat(np.arange(train_qrels.num_queries), np.diff(train_qrels.offsets))
    relevant = train_qrels.grades >= relevance_level
    weights = train_qrels.grades[relevant].astype(np.float64)
    totals = np.bincount(query_of[relevant], weights, minlength=train_qrels.num_queries)
    mass = np.bincount(train_qrels.doc_rows[relevant], weights / totals[query_of[relevant]], minlength=num_documents)
    prior = mass / max(mass.sum(), 1e-12)
    return (strength * np.log(prior + smoothing / num_documents)).astype(np.float32)


class FullCorpusSoftmax(Term):
    name = "task_loss"
    order = 0
    tables = frozenset({CORPUS})

    def __init__(self, config):
        self.task_weight, self.z_loss, self.chunk = config.loss.task_weight, config.loss.z_loss, config.train.corpus_chunk

    def weights(self, member_values):
        return super().weights(member_values) * self.task_weight

    def __call__(self, inputs: TermInputs) -> jax.Array:
        # Temperatures differ per member, so the loss is built with τ = 1 on the scaled vectors.
        loss = make_corpus_softmax_loss(inputs.mesh, temperature=1.0, z_loss=self.z_loss, chunk=self.chunk)
        return loss(inputs.scaled, inputs.tables[CORPUS], inputs.batch["positive_ids"],
                    inputs.batch["positive_weights"]).sum(axis=1)


@register_term("full_corpus")
def _factory(config, dataset):
    if config.loss.kind != "full_corpus" or config.loss.task_weight <= 0:
        return None
    return matryoshka.wrap(FullCorpusSoftmax(config), config.loss.matryoshka_dims)
