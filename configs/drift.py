"""Query drift compensation: a head maps a new encoder B's queries into an old encoder A's index.

Use on a drift dataset (A's corpus, B's queries, A's query embeddings as `--query-targets`, optionally texts
embedded by both as `--paired-source/--paired-target`). The head starts at the paired ridge map (the best
closed form on our data), then trains on both signals: the full-corpus softmax against A's corpus and the
distillation `‖f(q_B) − q_A‖²`. Unlike a head over one encoder, the map must move far from the identity, so
the residual is barely decayed, there is no recovery pull towards `q_B`, and an output bias (a mean shift) is
allowed. Variant `demo` (`--config configs/drift.py:demo`) applies the same on top of `configs/demo.py`.
"""

from pathlib import Path

from esep_jax.config import Config, load_config_file, override

# A drift head maps between two spaces: no gate (the base, B's raw query on A's index, is no fallback) and no
# documents held out for the new-documents view (this is a map, not a re-ranker).
DRIFT = {"model.use_bias": True, "model.init": "paired_ridge", "model.gate": "none", "loss.recovery_weight": 0.0,
         "loss.distill": "mse", "loss.distill_weight": 1.0, "optim.learning_rate": 1e-3, "optim.weight_decay": 1e-4,
         "train.new_document_fraction": 0.0}
# What the measured drift runs contrasted against: every document, τ 0.05 (the demo variant keeps the demo's).
BASE = {"loss.negatives": "all", "loss.temperature": 0.05}


def base_config(variant: str) -> Config:
    """The config a drift variant starts from: the demo's, or the defaults with `BASE`."""
    if variant == "demo":
        return load_config_file(str(Path(__file__).with_name("demo.py")))
    if variant:
        raise ValueError(f"unknown variant {variant!r} (variants: demo)")
    return override(Config(), BASE)


def get_config(variant: str = "") -> Config:
    return override(base_config(variant), DRIFT)
