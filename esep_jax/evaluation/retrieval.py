"""Exact maximum-inner-product search on the device, in chunks.

The corpus is placed on the device once as `[blocks, corpus_chunk, d]`; queries go through in chunks of
`query_chunk`, and for each chunk a scan over corpus blocks keeps a running top-k. Device memory is
O(query_chunk · corpus_chunk) beyond the corpus, and the host only ever sees `[Q, k]` results — never a
`[Q, N]` score matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esep_jax.objectives.corpus_softmax import widen


def _scan_top_k(queries: jax.Array, blocks: jax.Array, num_documents, k: int, offset=0):
    """Running top-k of `queries` over corpus `blocks [nb, chunk, d]` whose first row is corpus row `offset`."""
    block_size = blocks.shape[1]

    def scan_block(carry, block_and_index):
        best_scores, best_rows = carry
        block, index = block_and_index
        block = widen(block)  # a bfloat16 corpus placed on a CPU as its bits
        scores = jnp.einsum("qd,nd->qn", queries.astype(block.dtype), block, preferred_element_type=jnp.float32)
        rows = offset + index * block_size + jnp.arange(block_size, dtype=jnp.int32)
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


_chunk_top_k = jax.jit(_scan_top_k, static_argnames=("k",))


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


def _to_host(array: jax.Array, multihost_utils) -> np.ndarray:
    """A global result array as numpy on this process: the local copy when this process holds all of it (the
    result is replicated over the corpus axis), else gathered from the processes that hold its pieces."""
    if array.is_fully_addressable:
        return np.asarray(array)
    local = array.addressable_shards[0].data
    if local.shape == array.shape:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class ShardedExactIndex:
    """Exact top-k over a corpus sharded on a (data, corpus) mesh — the trainer's own `ShardedCorpus` rows — so
    no process ever holds more than its corpus shard, for evaluation as for training.

    Each device ranks its slice of a query chunk (split over `data`) against its corpus rows (split over
    `corpus`); the per-shard top-k lists are gathered over `corpus` and merged (exact: the global top-k is within
    the union of the shards' top-k); every process then receives the whole `[Q, k]` result.
    """

    def __init__(self, embeddings: jax.Array, num_documents: int, mesh, chunk: int):
        """`embeddings`, `chunk`: a `ShardedCorpus`'s (its rows per shard are a multiple of its chunk)."""
        from esep_jax.objectives.corpus_softmax import CORPUS, DATA

        self.embeddings, self.num_documents, self.mesh, self.chunk = embeddings, int(num_documents), mesh, chunk
        self.dim = int(embeddings.shape[1])
        self._data, self._corpus = DATA, CORPUS
        self._searches: dict[int, object] = {}

    def _search_fn(self, k: int):
        from jax.sharding import PartitionSpec as P

        if k in self._searches:
            return self._searches[k]
        data, corpus_axis, num_documents, chunk = self._data, self._corpus, self.num_documents, self.chunk

        def local(queries, rows):
            # This device's rows, scanned block by block with a running top-k: memory O(queries · chunk).
            blocks = rows.reshape(-1, min(chunk, rows.shape[0]), rows.shape[1])
            offset = jax.lax.axis_index(corpus_axis) * rows.shape[0]
            top_rows, top_scores = _scan_top_k(queries, blocks, num_documents, min(k, rows.shape[0]), offset)
            # The shards' lists side by side, then the global top-k.
            all_scores = jax.lax.all_gather(top_scores, corpus_axis, axis=1, tiled=True)
            all_rows = jax.lax.all_gather(top_rows, corpus_axis, axis=1, tiled=True)
            best, where = jax.lax.top_k(all_scores, k)
            return jnp.take_along_axis(all_rows, where, axis=1), best

        search = jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=(P(data), P(corpus_axis)),
                                       out_specs=(P(data), P(data)), check_vma=False))
        self._searches[k] = search
        return search

    def search(self, query_vectors, k: int, query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus rows and scores for each query: int32 `[Q, k']`, float32 `[Q, k']`, k' = min(k, N)."""
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P

        k = min(k, self.num_documents)
        search = self._search_fn(k)
        data_size = self.mesh.shape[self._data]
        chunk = -(-min(query_chunk, max(len(query_vectors), 1)) // data_size) * data_size
        num_queries = query_vectors.shape[0]
        rows = np.empty((num_queries, k), np.int32)
        scores = np.empty((num_queries, k), np.float32)
        sharding = NamedSharding(self.mesh, P(self._data))
        for start in range(0, num_queries, chunk):
            block = np.asarray(query_vectors[start:start + chunk], np.float32)
            valid = block.shape[0]
            block = np.pad(block, ((0, chunk - valid), (0, 0)))  # one shape for every call: one compilation
            queries = jax.make_array_from_callback(block.shape, sharding, lambda index, b=block: b[index])
            top_rows, top_scores = search(queries, self.embeddings)
            rows[start:start + valid] = _to_host(top_rows, multihost_utils)[:valid]
            scores[start:start + valid] = _to_host(top_scores, multihost_utils)[:valid]
        return rows, scores
