"""The bundled demo (code search over the Python standard library): `bash launch/demo.sh` trains with this.

Each query has a single relevant function, and test functions never occur in training. Documents that are
never positives in training are test (or distractor) functions, so the softmax contrasts only against
documents judged in training (`negatives="judged"`): the head learns how docstring summaries relate to code,
not that unseen functions should rank low.
"""

from esep_jax.config import Config


def get_config() -> Config:
    config = Config()
    config.loss.negatives = "judged"
    config.loss.temperature = 0.02
    config.train.num_steps = 400
    config.train.eval_every = 20
    config.train.checkpoint_every = 100
    config.train.patience = 5
    return config
