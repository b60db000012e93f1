"""The bundled demo (code search over the Python standard library): `bash launch/demo.sh` trains with this.

Each query has a single relevant function, and test functions never occur in training. Documents that are
never positives in training are test (or distractor) functions, so the softmax contrasts only against
documents judged in training (`negatives="judged"`): the head learns how docstring summaries relate to code,
not that unseen functions should rank low.
"""

from esep_jax.config import Config, override

DEMO = {"loss.negatives": "judged", "loss.temperature": 0.02, "train.num_steps": 400, "train.eval_every": 20,
        "train.checkpoint_every": 100, "train.patience": 5}


def get_config() -> Config:
    return override(Config(), DEMO)
