"""Exact maximum-inner-product search on the device, in chunks.

The corpus is placed on the device once as `[blocks, corpus_chunk, d]`; queries go through in chunks of
`query_chunk`, and for each chunk a scan over corpus blocks keeps a running top-k. Device memory is
O(query_chunk · corpus_chunk) beyond the corpus, and the host only ever sees `[Q, k]` results — never a
`[Q, N]` score matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_top_k(queries: jax.Array, blocks: jax.Array, num_documents: jax.Array, k: int):
    block_size = blocks.shape[1]

    def scan_block(carry, block_and_index):
        best_scores, best_rows = carry
        block, index = block_and_index
        scores = jnp.einsum("qd,nd->qn", queries, block.astype(queries.dtype),
                            preferred_element_type=jnp.float32)
        rows = index * block_size + jnp.arange(block_size, dtype=jnp.int32)
        scores = jnp.where(rows[None, :] < num_documents, scores, -jnp.inf)
        merged_scores = jnp.concatenate([best_scores, scores], axis=1)
        merged_rows = jnp.concatenate([best_rows, jnp.broadcast_to(rows, scores.shape)], axis=1)
        top_scores, positions = jax.lax.top_k(merged_scores, k)
        return (top_scores, jnp.take_along_axis(merged_rows, positions, axis=1)), None

    init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((queries.shape[0], k), -1, jnp.int32))
    indices = jnp.arange(blocks.shape[0], dtype=jnp.int32)
    (scores, rows), _ = jax.lax.scan(scan_block, init, (blocks, indices))
    return rows, scores


class ExactIndex:
    """Brute-force top-k over a device-resident corpus."""

    def __init__(self, corpus, corpus_chunk: int = 65536, dtype=jnp.float32):
        corpus = jnp.asarray(corpus, dtype=dtype)
        self.num_documents, self.dim = corpus.shape
        chunk = min(corpus_chunk, self.num_documents)
        num_blocks = -(-self.num_documents // chunk)
        padded = jnp.pad(corpus, ((0, num_blocks * chunk - self.num_documents), (0, 0)))
        self.blocks = padded.reshape(num_blocks, chunk, self.dim)

    def search(self, query_vectors, k: int, query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus rows and scores for each query: int32 `[Q, k']`, float32 `[Q, k']`, k' = min(k, N)."""
        k = min(k, self.num_documents)
        num_queries = query_vectors.shape[0]
        rows = np.empty((num_queries, k), np.int32)
        scores = np.empty((num_queries, k), np.float32)
        for start in range(0, num_queries, query_chunk):
            chunk = jnp.asarray(query_vectors[start:start + query_chunk], dtype=jnp.float32)
            # Pad the last chunk so every call has one shape and compiles once.
            valid = chunk.shape[0]
            if valid < query_chunk and num_queries > query_chunk:
                chunk = jnp.pad(chunk, ((0, query_chunk - valid), (0, 0)))
            top_rows, top_scores = _chunk_top_k(chunk, self.blocks, self.num_documents, k)
            rows[start:start + valid] = np.asarray(top_rows[:valid])
            scores[start:start + valid] = np.asarray(top_scores[:valid])
        return rows, scores
