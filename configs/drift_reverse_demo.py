"""`configs/drift_reverse.py` on top of `configs/demo.py` with a linear head: B = MiniLM queries on the demo's static index."""

from esep_jax.config import sibling_config_module


def _load(name: str):
    return sibling_config_module(__file__, name)


def get_config():
    config = _load("drift_reverse").apply_reverse_drift_settings(_load("demo").get_config())
    config.model.head = "linear"  # enough here: 95.7 % retention (the MLP head: 95.0 % when stopped at step 800)
    config.train.num_steps = 1500
    config.train.eval_every = 50
    config.train.patience = 10
    return config
