"""Serving an exported bundle without JAX (numpy, scann and safetensors only; PyStemmer for hybrid search)."""

from esep_jax.serving.hybrid import Fusion
from esep_jax.serving.searcher import BundleError, ChecksumError, QueryError, Searcher

__all__ = ["BundleError", "ChecksumError", "Fusion", "QueryError", "Searcher"]
