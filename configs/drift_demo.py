"""`configs/drift.py` on top of `configs/demo.py`: query drift on the bundled demo data."""

import importlib.util
from pathlib import Path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"esep_config_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    return _load("drift").apply_drift_settings(_load("demo").get_config())
