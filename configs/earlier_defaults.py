"""The defaults of esep-jax 0.1, before "Heads that generalise" (README): every document a negative, τ 0.05,
recovery weight 1, no in-domain gate, no documents held out for a new-documents dev view.

The studies in docs/signals.md (mined negatives, teacher distillation, Matryoshka) were measured with these;
their commands name this file so the numbers stay reproducible.
"""

from esep_jax.config import Config, override

EARLIER_DEFAULTS = {"loss.negatives": "all", "loss.temperature": 0.05, "loss.recovery_weight": 1.0,
                    "model.gate": "none", "train.new_document_fraction": 0.0}


def get_config() -> Config:
    return override(Config(), EARLIER_DEFAULTS)
