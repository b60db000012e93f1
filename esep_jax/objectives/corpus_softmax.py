"""The exact full-corpus softmax at scale: blockwise, sharded over devices, one pass over the corpus.

For query vectors `u` (the head's output), corpus rows `c_j`, temperature τ, a per-document logit bias `b_j`
and a normalised multi-positive target `w`, the per-query loss is

    loss_i = LSE_j(s_ij) − Σ_p w_ip s_ip (+ z · LSE_j(s_ij)²),     s_ij = <u_i, c_j> / τ + b_j.

The bias is −inf for documents the softmax does not contrast against (padding, `loss.negatives=judged`) and
otherwise a training-time logit adjustment (`objectives/full_corpus.py`); it is a constant, so the gradient
below does not change.

The corpus is frozen, so the only gradient needed is the one to `u`:

    ∂loss_i/∂u_i = ((1 + 2z·LSE_i) Σ_j p_ij c_j − Σ_p w_ip c_p) / τ,

a softmax-weighted sum of corpus rows. Like flash attention with V = the corpus, one scan over corpus chunks keeps
a running normaliser and the running weighted sum of rows, so the forward pass already holds the
gradient and the custom VJP needs no second pass. Memory is O(B·chunk + N·d); no `[B, N]` matrix exists.

The scan needs no running max: each row's shift is fixed at its max over the first chunk (`_scan_rows`), so a
chunk costs two matmuls, one exp and one sum; rows whose sums would overflow are scanned again with one. On a
CPU three more things keep the scan in cache and in memory: the chunk shrinks so a `[rows, chunk]` score tile
is about `CPU_TILE_BYTES` (`scan_chunk`), the rows (a batch, an ensemble's folded members) are scanned in row
blocks so the running sums stay in cache (`row_block`), and a bfloat16 corpus is placed as its raw bits and
read back chunk by chunk (`packs_bfloat16`, `matmul_rows`), since XLA's CPU backend would otherwise convert
the whole corpus up front.

Sharding: on a mesh with axes (data, corpus), queries are split over `data` and corpus rows over `corpus`. Each
device scans its own rows; the partial (shift, normaliser, weighted sum) triples are combined across `corpus`
with pmax/psum, which is exact. The backward pass is elementwise on data-sharded arrays (no collectives), and
gradients of replicated head parameters are reduced over `data` by the surrounding `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esep_jax.objectives.targets import target_distribution

DATA, CORPUS = "data", "corpus"
# On a CPU the scan's [rows, chunk] score tile is passed over several times per chunk (the exp, the sum, the
# second matmul), and the running weighted sum [rows, d] once more. Kept small — about CPU_TILE_BYTES for the
# tile, at most CPU_ROW_BLOCK query rows per scan — they stay in cache instead of streaming through memory on
# every pass. Timed in alternation in one process against other sizes (d = 384, docs/performance.md): at
# N = 1M, B = 8,192, 8 MiB and 1,024 rows beat 16 MiB and 4,096 rows by 5 % and 4 MiB and 1,024 rows by 6 %; at
# N = 100k, B = 4,096, 1,024-row blocks beat 4,096 by 3–5 %, 8 and 4 MiB tie, and 2 MiB or 512 rows lose 2–3.5 %.
# Accelerators keep the configured chunk and every row (their tiles live in HBM either way, and fewer, larger
# scan steps cost less loop overhead there).
CPU_TILE_BYTES = 8 * 2**20
CPU_MIN_CHUNK = 256
CPU_ROW_BLOCK = 1024
# Terms below e^-87 flush to zero: `rows` of them stay under 2^-30 of a normaliser of at least rows·e^-66.
UNDERFLOW_FLOOR = float(np.exp(-66.0))
RESCAN_FRACTION = 32


def packs_bfloat16(dtype, backend: str | None = None) -> bool:
    """Whether a corpus of `dtype` is placed as raw 16-bit patterns: bfloat16 on a CPU.

    Given a bfloat16 corpus array, XLA's CPU backend converts the *whole* corpus to float32 ahead of the scan —
    the optimised HLO shows the loop carrying an f32 copy; an optimization_barrier, a bit-level widening inside
    the body and slicing inside the body all still got it — twice the corpus in memory, which is what made an
    8.8M × 768 corpus not fit in 24 GiB. Placed as uint16, which XLA leaves alone, each chunk is turned back
    into numbers inside the scan (`matmul_rows`) and nothing corpus-sized is added."""
    return np.dtype(dtype) == np.dtype(jnp.bfloat16) and (backend or jax.default_backend()) == "cpu"


def widen(rows: jax.Array) -> jax.Array:
    """Corpus rows as float32: packed bfloat16 bits (uint16) widened exactly — a bfloat16's bits are the high
    half of the float32 it stands for — and anything else unchanged."""
    if rows.dtype != jnp.uint16:
        return rows
    return jax.lax.bitcast_convert_type(rows.astype(jnp.uint32) << 16, jnp.float32)


@functools.cache
def native_bfloat16_dots() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read
    from /proc/cpuinfo; False where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def matmul_rows(rows: jax.Array) -> jax.Array:
    """Corpus rows as the scan's matmul operand. Packed bfloat16 bits (a bfloat16 corpus on a CPU) become
    bfloat16 again where the CPU multiplies bfloat16 natively — the queries and probabilities are then cast to
    bfloat16 too, exactly as on an accelerator, with float32 sums; the step at N = 100k, B = 4,096 ran 1.5×
    faster than on widened rows (`esep-jax bench train --dtype bfloat16`) in the same memory — and are widened
    to float32 elsewhere (`widen`). Anything else is unchanged."""
    if rows.dtype == jnp.uint16 and native_bfloat16_dots():
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)
    return widen(rows)


def make_data_corpus_mesh(corpus_shards: int = 1, devices=None) -> Mesh:
    """A (data, corpus) mesh over all devices: `corpus_shards` along `corpus`, the rest along `data`."""
    devices = jax.devices() if devices is None else devices
    if len(devices) % corpus_shards:
        raise ValueError(f"{len(devices)} devices cannot be split into {corpus_shards} corpus shards")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((len(devices) // corpus_shards, corpus_shards), (DATA, CORPUS), axis_types=(auto, auto),
                         devices=devices)


class ShardedCorpus:
    """A corpus placed on a (data, corpus) mesh: rows padded to the mesh and chunk, split over `corpus`.

    `logit_bias` `[N]` is added to every query's logit of each document: −inf excludes a document from the
    softmax (padding rows always are), a finite value adjusts it. `mask` is the boolean shorthand (False = −inf).
    """

    def __init__(self, embeddings, mesh: Mesh, chunk: int = 8192, dtype=jnp.float32,
                 mask: np.ndarray | None = None, logit_bias: np.ndarray | None = None,
                 rows: np.ndarray | None = None):
        """`embeddings`: anything sliceable by rows into numpy (an array, a memory map, a tensorstore).

        `rows` (sorted row numbers of `embeddings`): place only those, in that order — the documents a task
        softmax contrasts against, when most are excluded. `mask` and `logit_bias` index the rows of
        `embeddings` either way."""
        num_documents, self.dim = embeddings.shape
        if rows is not None:
            mask = None if mask is None else mask[rows]
            logit_bias = None if logit_bias is None else logit_bias[rows]
            num_documents = len(rows)
        shards = mesh.shape[CORPUS]
        per_shard = -(-num_documents // shards)
        self.chunk = int(min(chunk, per_shard))
        per_shard = -(-per_shard // self.chunk) * self.chunk
        padded_rows = per_shard * shards
        self.num_documents, self.mesh = num_documents, mesh
        full_bias = np.full(padded_rows, -np.inf, np.float32)
        full_bias[:num_documents] = 0.0 if logit_bias is None else logit_bias
        if mask is not None:
            full_bias[:num_documents] = np.where(mask, full_bias[:num_documents], -np.inf)
        storage = np.dtype(dtype)
        packed = packs_bfloat16(storage)
        self.host_bytes_read = 0  # corpus bytes this process read (its own devices' rows only)

        def device_rows(index) -> np.ndarray:
            # Each device's block is read on its own, so the host never holds a padded copy of the corpus
            # (and a process of a multi-host job reads only the rows of its own devices).
            start, stop, _ = index[0].indices(padded_rows)
            block = np.zeros((stop - start, self.dim), storage)
            real_stop = min(stop, num_documents)
            if start < real_stop:
                values = embeddings[start:real_stop] if rows is None else embeddings[rows[start:real_stop]]
                values = values.read().result() if hasattr(values, "read") else values
                block[:real_stop - start] = values  # cast on assignment: no third copy of the shard
                self.host_bytes_read += block[:real_stop - start].nbytes
            return block.view(np.uint16) if packed else block

        sharding = NamedSharding(mesh, P(CORPUS))
        shape = (padded_rows, self.dim)
        # One device's block at a time: read, placed, released before the next is read (make_array_from_callback
        # would hold every block on the host before placing them, twice the corpus at the peak).
        pieces = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            pieces.append(jax.device_put(device_rows(index), device))
            jax.block_until_ready(pieces[-1])
        self.embeddings = jax.make_array_from_single_device_arrays(shape, sharding, pieces)
        self.logit_bias = jax.make_array_from_callback((padded_rows,), sharding, lambda index: full_bias[index])

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.size * self.embeddings.dtype.itemsize)


def scan_local_corpus(queries, corpus, bias, chunk):
    """One device: (shift [B], normaliser [B], weighted row sum [B, d]) over its corpus rows (`_scan_rows`):
    normaliser = Σ_j exp(s_j − shift), weighted sum = Σ_j exp(s_j − shift) c_j, for any shift of a row (the
    devices' triples are combined relative to the largest).

    On a CPU the rows (a batch, or an ensemble's folded members) are scanned in row blocks of at most
    `CPU_ROW_BLOCK`, each over the whole corpus: the running weighted sum `[rows, d]` is accumulated at every
    chunk, and for 16,384 rows it is 25 MB — streamed through memory hundreds of times per step — where a
    block's stays in cache. Re-reading the corpus per block costs less than that stream."""
    rows = queries.shape[0]
    chunk = min(chunk, corpus.shape[0])  # ShardedCorpus pads to a multiple
    block = row_block(rows)
    if block == rows:
        return _scan_rows(queries, corpus, bias, chunk)
    parts = jax.lax.map(lambda q: _scan_rows(q, corpus, bias, chunk),
                        queries.reshape(rows // block, block, -1))
    shift, normaliser, weighted_sum = parts
    return shift.reshape(rows), normaliser.reshape(rows), weighted_sum.reshape(rows, -1)


def row_block(rows: int, backend: str | None = None) -> int:
    """Query rows per corpus scan on one device: all of them, or on a CPU halved to at most `CPU_ROW_BLOCK`
    (halving keeps it a divisor of `rows`)."""
    if (backend or jax.default_backend()) != "cpu":
        return rows
    while rows % 2 == 0 and rows > CPU_ROW_BLOCK:
        rows //= 2
    return rows


def _scan_rows(queries, corpus, bias, chunk):
    """(shift, normaliser, weighted row sum) of one row block over this device's corpus rows.

    The shift is fixed after the first chunk, at each row's max score in it, so no running max is needed: each
    further chunk is one matmul, one fused exp, one sum and one matmul — the max pass over the score tile and
    rescaling the running sums when the max grows are gone (the CPU step at N = 100k, B = 4,096 ran 7 %
    faster, timed in one process: docs/performance.md). Later scores above the shift are fine up to e^88 (a max
    usually grows by a few units over a corpus, not by 88), and every row keeps its first max's term of 1, so
    nothing that matters can underflow. Exactness is checked, not assumed: rows whose sums overflowed, or (their
    first chunk masked out, shift = the largest logit bias) underflowed, are scanned again the classic way, with
    a running max (`_scan_rows_with_running_max`) — on their own when they are at most 1/`RESCAN_FRACTION` of
    the block (with unit-norm embeddings none are: a row's max would have to grow by 88 after its first chunk),
    else the whole block."""
    chunk = scan_chunk(chunk, queries.shape[0])
    num_chunks = corpus.shape[0] // chunk
    blocks = corpus.reshape(num_chunks, chunk, corpus.shape[1])
    block_biases = bias.reshape(num_chunks, chunk)

    def accumulate(normaliser, weighted_sum, block, scores):
        probabilities = jnp.exp(scores - shift[:, None])
        return normaliser + probabilities.sum(axis=1), weighted_sum + _weighted_rows(probabilities, block)

    bias_max = jnp.max(jnp.where(jnp.isfinite(bias), bias, -jnp.inf))  # −inf: nothing here is contrasted
    first_block, first_scores = _chunk_scores(queries, blocks, block_biases, 0)
    first_max = first_scores.max(axis=1)
    shift = jnp.where(jnp.isfinite(first_max), first_max, jnp.where(jnp.isfinite(bias_max), bias_max, 0.0))
    reported_shift = jnp.where(jnp.isfinite(bias_max), shift, -jnp.inf)  # no contrasted rows: combined as 0
    batch = queries.shape[0]
    zeros = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, corpus.shape[1]), jnp.float32))
    # Inside shard_map the sums differ per device (they depend on both the queries and the corpus shard).
    first = accumulate(*jax.lax.pcast(zeros, (DATA, CORPUS), to="varying"), first_block, first_scores)
    if num_chunks == 1:
        # The shift is every row's max over all of this device's rows: terms are at most 1 and the max's is 1,
        # so nothing can overflow or underflow — and small corpora compile no loop and no rescan.
        return reported_shift, *first
    live = _live_chunks(block_biases)
    normaliser, weighted_sum = jax.lax.fori_loop(
        1, live, lambda index, sums: accumulate(*sums, *_chunk_scores(queries, blocks, block_biases, index)), first)
    lost = jnp.isfinite(bias_max) & ~(jnp.isfinite(weighted_sum).all(axis=1)
                                      & (normaliser >= corpus.shape[0] * UNDERFLOW_FLOOR)
                                      & (normaliser < jnp.inf))
    sums = (reported_shift, normaliser, weighted_sum)
    few = max(1, batch // RESCAN_FRACTION)

    def rescan_the_lost_rows():
        # A fixed number of rows, so the shapes are static; the padding repeats a lost row (same values).
        rows = jnp.nonzero(lost, size=few, fill_value=jnp.argmax(lost))[0]
        exact = _scan_rows_with_running_max(queries[rows], blocks, block_biases, live)
        return tuple(total.at[rows].set(part) for total, part in zip(sums, exact))

    count = jnp.sum(lost)
    return jax.lax.switch((count > 0).astype(jnp.int32) + (count > few).astype(jnp.int32), [
        lambda: sums, rescan_the_lost_rows, lambda: _scan_rows_with_running_max(queries, blocks, block_biases, live)])


def _chunk_scores(queries, blocks, block_biases, index):
    """(chunk `index` as a matmul operand, the queries' scores against it plus its logit biases `[B, chunk]`)."""
    block = matmul_rows(blocks[index])
    scores = jnp.einsum("bd,nd->bn", queries.astype(block.dtype), block, preferred_element_type=jnp.float32)
    return block, scores + block_biases[index][None, :]


def _weighted_rows(probabilities, block):
    """Σ_j p_bj c_j over one chunk `[B, d]`, in the chunk's matmul dtype with float32 sums."""
    return jnp.einsum("bn,nd->bd", probabilities.astype(block.dtype), block, preferred_element_type=jnp.float32)


def _live_chunks(block_biases):
    """Chunks up to the last one holding a contrasted row: the padding after it (up to a configured chunk of
    rows — 6 % of the work at N = 100,000 with chunk 8,192 scanned in CPU chunks of 1,024) is not scanned."""
    contrasted = jnp.isfinite(block_biases).any(axis=1)
    return jnp.max(jnp.where(contrasted, jnp.arange(1, block_biases.shape[0] + 1), 0))


def _scan_rows_with_running_max(queries, blocks, block_biases, live):
    """The classic online softmax over the first `live` chunks: the shift is the running max, and the sums are
    rescaled whenever it grows."""

    def body(index, carry):
        shift, normaliser, weighted_sum = carry
        block, scores = _chunk_scores(queries, blocks, block_biases, index)
        new_shift = jnp.maximum(shift, scores.max(axis=1))
        safe = jnp.where(jnp.isfinite(new_shift), new_shift, 0.0)  # no real rows yet: every term is 0
        rescale = jnp.exp(shift - safe)
        probabilities = jnp.exp(scores - safe[:, None])
        return (new_shift, normaliser * rescale + probabilities.sum(axis=1),
                weighted_sum * rescale[:, None] + _weighted_rows(probabilities, block))

    batch = queries.shape[0]
    init = (jnp.full((batch,), -jnp.inf, jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, blocks.shape[2]), jnp.float32))
    init = jax.lax.pcast(init, (DATA, CORPUS), to="varying")
    return jax.lax.fori_loop(0, live, body, init)


def scan_chunk(chunk: int, rows: int, backend: str | None = None) -> int:
    """Corpus rows per scan step for `rows` query rows on one device: `chunk`, halved on a CPU while the score
    tile exceeds `CPU_TILE_BYTES` (halving keeps it a divisor of the padded corpus shard)."""
    if (backend or jax.default_backend()) != "cpu":
        return chunk
    while chunk % 2 == 0 and chunk // 2 >= CPU_MIN_CHUNK and 4 * rows * chunk > CPU_TILE_BYTES:
        chunk //= 2
    return chunk


def _local_positive_sums(corpus, bias, targets, positive_ids):
    """(Σ_p w_ip c_p `[B, d]`, Σ_p w_ip b_p `[B]`) over the positives that live in this device's corpus rows."""
    rows_per_shard = corpus.shape[0]
    local_ids = positive_ids - jax.lax.axis_index(CORPUS) * rows_per_shard
    here = (local_ids >= 0) & (local_ids < rows_per_shard) & (positive_ids >= 0)
    safe_ids = jnp.clip(local_ids, 0, rows_per_shard - 1)
    weights = jnp.where(here, targets, 0.0)
    rows = widen(corpus[safe_ids]).astype(jnp.float32)  # [B, P, d]
    # `where`, not a product: a padding slot may point at a −inf (excluded) row.
    bias_sum = jnp.where(weights > 0, weights * bias[safe_ids], 0.0).sum(axis=1)
    return jnp.einsum("bp,bpd->bd", weights, rows), bias_sum


def corpus_softmax_summaries(rows, corpus, bias, chunk):
    """Inside `shard_map`: per row of already-scaled vectors, over the whole corpus sharded along `corpus`,
    (LSE_j(<r, c_j> + b_j) [R], the softmax-weighted corpus row E_p[c] [R, d]) — exact: the devices' partial
    (shift, normaliser, weighted sum) triples are combined with pmax/psum."""
    local_shift, local_normaliser, local_sum = scan_local_corpus(rows, corpus, bias, chunk)
    global_shift = jax.lax.pmax(local_shift, CORPUS)
    rescale = jnp.exp(local_shift - global_shift)
    normaliser = jax.lax.psum(local_normaliser * rescale, CORPUS)
    expected_row = jax.lax.psum(local_sum * rescale[:, None], CORPUS) / normaliser[:, None]
    return global_shift + jnp.log(normaliser), expected_row


def _forward_shard(queries, corpus, bias, positive_ids, targets, *, temperature, z_loss, chunk):
    """Per-device forward: the per-query loss and its gradient with respect to the (unscaled) queries.

    `queries` may carry a leading member axis `[E, b, d]` (an ensemble sharing the batch's positives); the
    members are folded into the rows of one scan, so the corpus is read once for all of them, and the
    positives' rows are gathered once for all members.
    """
    members_axis = queries.ndim == 3
    stacked = queries if members_axis else queries[None]
    members, rows, dim = stacked.shape
    scaled = stacked.astype(jnp.float32) / temperature
    log_normaliser, expected_row = corpus_softmax_summaries(scaled.reshape(members * rows, dim), corpus, bias, chunk)
    log_normaliser = log_normaliser.reshape(members, rows)
    expected_row = expected_row.reshape(members, rows, dim)
    positive_row, positive_bias = jax.lax.psum(_local_positive_sums(corpus, bias, targets, positive_ids), CORPUS)
    positive_score = jnp.einsum("ebd,bd->eb", scaled, positive_row) + positive_bias
    loss = log_normaliser - positive_score + z_loss * jnp.square(log_normaliser)
    gradient = ((1.0 + 2.0 * z_loss * log_normaliser)[..., None] * expected_row - positive_row) / temperature
    return (loss, gradient) if members_axis else (loss[0], gradient[0])


def make_corpus_softmax_loss(mesh: Mesh, *, temperature: float, z_loss: float = 0.0, chunk: int = 8192):
    """Builds `loss(query_vectors [(E,) B, d], corpus: ShardedCorpus arrays, positive_ids, positive_weights)`,
    returning per-query losses `[(E,) B]`.

    Returns per-query losses equal to `losses.full_corpus_softmax_loss` (plus the optional z-loss), with a
    custom VJP that reuses the gradient computed in the forward pass. Queries must be sharded (or shardable)
    over the mesh's `data` axis; the corpus arrays come from `ShardedCorpus`.
    """
    forward_shard = functools.partial(_forward_shard, temperature=temperature, z_loss=z_loss, chunk=chunk)

    def sharded_forward(query_vectors, corpus, bias, positive_ids, targets):
        # Queries [B, d], or [E, B, d] for an ensemble: the batch axis is the one split over `data`.
        spec = P(DATA) if query_vectors.ndim == 2 else P(None, DATA)
        return jax.shard_map(forward_shard, mesh=mesh, in_specs=(spec, P(CORPUS), P(CORPUS), P(DATA), P(DATA)),
                             out_specs=(spec, spec))(query_vectors, corpus, bias, positive_ids, targets)

    @jax.custom_vjp
    def loss(query_vectors, corpus, bias, positive_ids, targets):
        return sharded_forward(query_vectors, corpus, bias, positive_ids, targets)[0]

    def loss_forward(query_vectors, corpus, bias, positive_ids, targets):
        per_query, gradient = sharded_forward(query_vectors, corpus, bias, positive_ids, targets)
        return per_query, gradient

    def loss_backward(gradient, cotangent):
        # The corpus, bias, ids and targets are data, not parameters: no cotangent flows to them.
        return (cotangent[..., None] * gradient, None, None, None, None)

    loss.defvjp(loss_forward, loss_backward)

    def per_query_loss(query_vectors, corpus: ShardedCorpus | tuple, positive_ids, positive_weights):
        embeddings, bias = (corpus.embeddings, corpus.logit_bias) if isinstance(corpus, ShardedCorpus) else corpus
        targets = target_distribution(positive_ids, positive_weights)
        return loss(query_vectors, embeddings, bias, positive_ids, targets)

    return per_query_loss
