"""Serving an exported bundle without JAX (numpy, scann and safetensors only)."""

from esep_jax.serving.searcher import BundleError, ChecksumError, QueryError, Searcher

__all__ = ["BundleError", "ChecksumError", "QueryError", "Searcher"]
