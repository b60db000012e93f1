"""The errors of the serving path (re-exported by `esep_jax.serving` and `esep_jax.serving.searcher`).

Each is an `InputError` (the CLI prints it as one line and exits 2) and a `ValueError` (what a library caller
catches for bad arguments); the HTTP server answers `QueryError` with a 4xx JSON error.
"""

from __future__ import annotations

from esep_jax.errors import InputError


class BundleError(InputError, ValueError):
    """A bundle that cannot be served: missing, malformed, or not matching its manifest."""


class ChecksumError(BundleError):
    """A bundle file whose sha256 differs from the one recorded at export: the file is damaged."""


class QueryError(InputError, ValueError):
    """Queries or search arguments that cannot be searched (wrong shape or dimension, NaN/Inf, bad k)."""
