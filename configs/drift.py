"""Query drift compensation: a head maps a new encoder B's queries into an old encoder A's index.

Use on a drift dataset (A's corpus, B's queries, A's query embeddings as `--query-targets`, optionally texts
embedded by both as `--paired-source/--paired-target`). The head starts at the paired ridge map (the best
closed form on our data), then trains on both signals: the full-corpus softmax against A's corpus and the
distillation `‖f(q_B) − q_A‖²`. Unlike a head over one encoder, the map must move far from the identity, so
the residual is barely decayed, there is no recovery pull towards `q_B`, and an output bias (a mean shift) is
allowed. `configs/drift_demo.py` is the same on top of the demo's settings.
"""

from esep_jax.config import Config


def apply_drift_settings(config: Config) -> Config:
    config.model.use_bias = True
    config.model.init = "paired_ridge"
    config.loss.recovery_weight = 0.0
    config.loss.distill = "mse"
    config.loss.distill_weight = 1.0
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-4
    return config


def get_config() -> Config:
    return apply_drift_settings(Config())
