"""esep_jax: train tiny query-side searching modules over frozen, precomputed embeddings."""

__version__ = "0.1.0"
