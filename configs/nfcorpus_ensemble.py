"""NFCorpus: an ensemble of 8 linear heads whose every member keeps zero-shot transfer (the README's table).

Members differ in learning rate, weight decay (towards the identity), recovery weight and temperature; all of
them sit in the region where a head improves NFCorpus without costing more than a point on other datasets
(low learning rate, strong decay, temperature >= 0.05 — lower temperatures and learning rates of 1e-3 with
weak decay were the members that broke zero-shot in `tools/studies/zero_shot_study.py`). Greedy selection on
dev then picks among safe members only.
"""

from esep_jax.config import Config, override


def get_config() -> Config:
    return override(Config(), {
        "ensemble.members": 8,
        "ensemble.learning_rate": (3e-4, 3e-4, 5e-4, 3e-4, 3e-4, 5e-4, 3e-4, 2e-4),
        "ensemble.weight_decay": (3, 10, 10, 10, 3, 10, 30, 3),
        "ensemble.recovery_weight": (2, 1, 2, 1, 2, 1, 1, 1),
        "ensemble.temperature": (0.05, 0.05, 0.05, 0.07, 0.07, 0.05, 0.05, 0.05),
        "train.num_steps": 600, "train.patience": 3})
