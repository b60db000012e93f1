"""Serving bundles: a trained head folded to plain tensors plus a tuned ScaNN index over the corpus.

`format` (the on-disk format and the numpy head) and `scann_index` (building and tuning) import only numpy and
scann, so the JAX-free serving path (`esep_jax.serving`) can use them; `bundle` (export) needs JAX. Nothing is
imported here so that importing this package stays as light as its lightest module.
"""
