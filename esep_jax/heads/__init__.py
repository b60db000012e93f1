"""Searching modules: small query-side heads `f` with score `<f(q), d>` (one module per head, registered in
`registry.py`), how ensembles of them combine (`ensemble.py`), the in-domain gate (`gate.py`, numpy only) and
closed-form maps (`closed_form.py`).

Names are loaded lazily, so importing a numpy-only module of this package (the gate, as the JAX-free serving
path does) does not import flax.
"""

import importlib

_EXPORTS = {"apply_members": "base", "base_projection": "base", "init_params": "base", "query_transform": "base",
            "HeadSpec": "registry", "build_head": "registry", "head_names": "registry", "head_spec": "registry",
            "register": "registry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"esep_jax.heads.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'esep_jax.heads' has no attribute {name!r}")
