"""Closed-form heads as starting points: `model.init` fits a map before the first step.

A linear head `f(q) = q E + q D [+ b]` starts at the identity (`D = 0`). With `model.init` it starts at a
closed-form map `(W, b)` from `esep_jax.heads.closed_form` instead (`D = W − E`), fitted on the training split:

- `paired_ridge`, `paired_procrustes`, `mean_shift`: query drift, from pairs of the same text under the query
  encoder and the corpus encoder (the dataset's `queries/targets` for the training queries, plus any
  `paired/*` texts);
- `supervised_ridge`, `supervised_procrustes`: query → the grade-weighted mean of its relevant documents.

Ridge shrinks towards E when the dims agree (towards 0 otherwise) with its alpha chosen on dev. The fitted map
is evaluated on dev at step 0 like the identity would be, so early stopping never returns anything worse on
dev than the closed form the run started from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.heads import closed_form
from esep_jax.config import Config
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.errors import InputError
from esep_jax.evaluation.evaluator import SplitEvaluator

def fit_initial_map(config: Config, dataset: Dataset, train_qrels: Qrels, corpus: np.ndarray,
                    dev: SplitEvaluator) -> closed_form.Map:
    """The closed-form `(W, b)` that `config.model.init` names, fitted on the training split."""
    name = config.model.init
    same_dim = dataset.query_dim == dataset.corpus_dim
    if name in ("paired_ridge", "paired_procrustes", "mean_shift"):
        source, target = closed_form.paired_rows(dataset, train_qrels)
    else:
        positions, target = closed_form.relevant_targets(train_qrels, corpus, config.eval.relevance_level)
        source = dataset.read_queries(train_qrels.query_rows[positions])
    if name == "mean_shift":
        if not same_dim:
            raise InputError("mean_shift needs equal query and corpus dims", field="config.model.init")
        return closed_form.mean_shift(source, target)
    if name.endswith("procrustes"):
        return closed_form.orthogonal_procrustes(source, target, center=config.model.use_bias)
    _, fitted, _ = closed_form.choose_alpha(source, target, dev, towards="identity" if same_dim else "zero",
                                            fit_intercept=config.model.use_bias)
    return fitted


def initialise_params(params, transform: closed_form.Map, use_bias: bool):
    """Every member's linear-head parameters set to represent `q ↦ q W + b`."""
    W, b = transform
    residual = W - closed_form.rectangular_identity(*W.shape).astype(np.float32)
    if np.any(b) and not use_bias:
        raise InputError("this initialiser has an intercept: set model.use_bias=true", field="config.model.init")
    members = jax.tree.leaves(params)[0].shape[0]
    updated = dict(params["residual"])
    updated["kernel"] = jnp.broadcast_to(jnp.asarray(residual), (members, *residual.shape))
    if use_bias:
        updated["bias"] = jnp.broadcast_to(jnp.asarray(b), (members, *b.shape))
    return {**params, "residual": updated}
