"""The bundled demo (code search over the Python standard library) with a short schedule: 400 steps, dev every 20.

`bash launch/demo.sh` trains with the defaults; this config is the faster cadence the drift demos build on.

Each query has a single relevant function, and test functions never occur in training. Documents that are
never positives in training are test (or distractor) functions, so the softmax contrasts only against
documents judged in training (`negatives="judged"`): the head learns how docstring summaries relate to code,
not that unseen functions should rank low.
"""

from pathlib import Path

from esep_jax.config import Config, load_config_file, override

DEMO = {"loss.negatives": "judged", "loss.temperature": 0.02, "train.num_steps": 400, "train.eval_every": 20,
        "train.checkpoint_every": 100, "train.patience": 5}


def get_config(variant: str = "") -> Config:
    """Variant `earlier`: on top of esep-jax 0.1's defaults (configs/earlier_defaults.py), as the studies in
    docs/signals.md were measured."""
    if variant == "earlier":
        return override(load_config_file(str(Path(__file__).with_name("earlier_defaults.py"))), DEMO)
    if variant:
        raise ValueError(f"unknown variant {variant!r} (variants: earlier)")
    return override(Config(), DEMO)
