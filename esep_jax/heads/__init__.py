"""Searching modules: small query-side heads `f` with score `<f(q), d>` (one module per head, registered in
`registry.py`), how ensembles of them combine (`ensemble.py`), and closed-form maps (`closed_form.py`)."""

from esep_jax.heads.base import apply_members, base_projection, init_params, query_transform
from esep_jax.heads.registry import HeadSpec, build_head, head_names, head_spec, register

__all__ = ["HeadSpec", "apply_members", "base_projection", "build_head", "head_names", "head_spec", "init_params",
           "query_transform", "register"]
