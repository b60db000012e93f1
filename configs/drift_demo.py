"""`configs/drift.py` on top of `configs/demo.py`: query drift on the bundled demo data."""

from esep_jax.config import sibling_config_module


def _load(name: str):
    return sibling_config_module(__file__, name)


def get_config():
    return _load("drift").apply_drift_settings(_load("demo").get_config())
