"""The blockwise full-corpus softmax equals the plain one — loss and gradient — on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esep_jax.objectives.corpus_softmax import ShardedCorpus, make_corpus_softmax_loss, make_data_corpus_mesh
from esep_jax.objectives.full_corpus import full_corpus_softmax_loss


def _inputs(seed=0, batch=6, docs=37, dim=8, positives=4):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(batch, dim)).astype(np.float32)
    corpus = rng.normal(size=(docs, dim)).astype(np.float32) / np.sqrt(dim)
    ids = rng.integers(0, docs, size=(batch, positives)).astype(np.int32)
    ids[0, 2:] = -1  # padding
    weights = rng.integers(1, 3, size=(batch, positives)).astype(np.float32)
    return queries, corpus, ids, weights


def _reference(queries, corpus, ids, weights, temperature, mask=None, z_loss=0.0):
    def total(q):
        per_query = full_corpus_softmax_loss(q, jnp.asarray(corpus), jnp.asarray(ids), jnp.asarray(weights),
                                             temperature, None if mask is None else jnp.asarray(mask))
        if z_loss:
            logits = q @ jnp.asarray(corpus).T / temperature
            if mask is not None:
                logits = jnp.where(mask[None], logits, -jnp.inf)
            per_query = per_query + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
        return per_query.sum(), per_query
    (_, per_query), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(queries))
    return np.asarray(per_query), np.asarray(grad)


def _blockwise(queries, corpus, ids, weights, temperature, chunk, mask=None, z_loss=0.0, dtype=jnp.float32):
    mesh = make_data_corpus_mesh(1)
    sharded = ShardedCorpus(corpus, mesh, chunk=chunk, dtype=dtype, mask=mask)
    loss = make_corpus_softmax_loss(mesh, temperature=temperature, z_loss=z_loss, chunk=chunk)

    def total(q):
        per_query = loss(q, sharded, jnp.asarray(ids), jnp.asarray(weights))
        return per_query.sum(), per_query
    (_, per_query), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(queries))
    return np.asarray(per_query), np.asarray(grad)


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 4096])
def test_equals_plain_loss_and_gradient(chunk):
    queries, corpus, ids, weights = _inputs()
    expected_loss, expected_grad = _reference(queries, corpus, ids, weights, 0.07)
    loss, grad = _blockwise(queries, corpus, ids, weights, 0.07, chunk)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_on_a_cpu_the_scan_chunk_shrinks_to_a_cache_sized_divisor():
    from esep_jax.objectives.corpus_softmax import CPU_MIN_CHUNK, CPU_TILE_BYTES, scan_chunk

    assert scan_chunk(8192, 1024, "cpu") == CPU_TILE_BYTES // (4 * 1024) == 2048
    assert scan_chunk(8192, 1024, "gpu") == 8192 and scan_chunk(8192, 16, "cpu") == 8192
    assert scan_chunk(8192, 1 << 20, "cpu") == CPU_MIN_CHUNK
    assert scan_chunk(3000, 4096, "cpu") == 375 and 3000 % 375 == 0  # halving keeps it a divisor
    # and the loss is unchanged when it does shrink: 2,048 rows are scanned in row blocks of 1,024, and
    # 4 bytes * 1,024 rows * 4,096 > the tile, so the chunk halves to 2,048 corpus rows
    queries, corpus, ids, weights = _inputs(seed=3, batch=2048, docs=4096, dim=4)
    expected_loss, expected_grad = _reference(queries, corpus, ids, weights, 0.1)
    loss, grad = _blockwise(queries, corpus, ids, weights, 0.1, 4096)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)  # sums of 4,096 terms, reordered


def test_ensemble_rows_scanned_in_row_blocks_equal_each_member_alone(monkeypatch):
    """An ensemble's members are folded into the scan's rows, which a CPU scans in row blocks; the positives
    are gathered once for all members. Each member's loss and gradient equal its own plain loss."""
    from esep_jax.objectives import corpus_softmax

    monkeypatch.setattr(corpus_softmax, "CPU_ROW_BLOCK", 4)
    assert corpus_softmax.row_block(24, "cpu") == 3 and corpus_softmax.row_block(24, "gpu") == 24
    members = np.stack([_inputs(seed=s)[0] for s in (4, 5, 6)])  # [3, 6, 8]: 18 rows, blocks of 4 → 9 × 2
    _, corpus, ids, weights = _inputs(seed=4)
    loss, grad = _blockwise(members, corpus, ids, weights, 0.07, 5)
    assert loss.shape == (3, 6) and grad.shape == members.shape
    for member in range(3):
        expected_loss, expected_grad = _reference(members[member], corpus, ids, weights, 0.07)
        np.testing.assert_allclose(loss[member], expected_loss, rtol=1e-5)
        # atol: cancellation in gradients of size ~15 (float32 rounding, not a different result)
        np.testing.assert_allclose(grad[member], expected_grad, rtol=1e-5, atol=2e-5)


def test_corpus_listwise_equals_the_plain_kl_and_its_gradient():
    """KL(softmax(teacher · C) ‖ softmax(student · C)) over the whole corpus, blockwise with a masked-out
    part, equals the plain [B, N] computation for every member; it is zero when student = teacher."""
    from esep_jax.objectives.corpus_listwise import corpus_listwise_reference, make_corpus_listwise_loss

    rng = np.random.default_rng(8)
    _, corpus, _, _ = _inputs(seed=2, docs=53)
    mask = rng.random(53) < 0.7
    students = rng.normal(size=(2, 6, 8)).astype(np.float32) * 3
    teacher = rng.normal(size=(6, 8)).astype(np.float32) * 3
    mesh = make_data_corpus_mesh(1)
    sharded = ShardedCorpus(corpus, mesh, chunk=7, mask=mask)
    loss = make_corpus_listwise_loss(mesh, chunk=7)
    bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)

    def blockwise(s):
        return loss(s, jnp.asarray(teacher), sharded.embeddings, sharded.logit_bias)
    value, grad = jax.jit(jax.value_and_grad(lambda s: blockwise(s).sum()))(jnp.asarray(students))
    plain = jax.value_and_grad(lambda s: corpus_listwise_reference(s, jnp.asarray(teacher), jnp.asarray(corpus),
                                                                   bias).sum())
    expected_value, expected_grad = plain(jnp.asarray(students))
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert float(value) > 1.0
    np.testing.assert_allclose(jax.jit(blockwise)(jnp.asarray(teacher)[None]), 0.0, atol=1e-5)


def test_mask_and_z_loss():
    queries, corpus, ids, weights = _inputs(seed=1)
    mask = np.random.default_rng(3).random(corpus.shape[0]) < 0.6
    mask[ids[ids >= 0]] = True  # positives are always among the contrasted documents
    expected_loss, expected_grad = _reference(queries, corpus, ids, weights, 0.1, mask, z_loss=1e-3)
    loss, grad = _blockwise(queries, corpus, ids, weights, 0.1, 7, mask, z_loss=1e-3)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_corpus_accumulates_in_float32(monkeypatch, native):
    """Both ways a CPU multiplies a bfloat16 corpus placed as bits: as bfloat16 (bf16 dot instructions) or
    widened to float32."""
    from esep_jax.objectives import corpus_softmax

    monkeypatch.setattr(corpus_softmax, "native_bfloat16_dots", lambda: native)
    block = corpus_softmax.matmul_rows(jnp.zeros((4, 8), jnp.uint16))
    assert block.dtype == (jnp.bfloat16 if native else jnp.float32)
    queries, corpus, ids, weights = _inputs(seed=2, docs=200, dim=32)
    # The reference sees the same bfloat16-rounded corpus; what remains is bf16 matmul inputs with f32 sums.
    rounded = np.asarray(jnp.asarray(corpus, jnp.bfloat16).astype(jnp.float32))
    expected_loss, expected_grad = _reference(queries, rounded, ids, weights, 0.05)
    loss, grad = _blockwise(queries, corpus, ids, weights, 0.05, 64, dtype=jnp.bfloat16)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-2)
    assert np.linalg.norm(grad - expected_grad) / np.linalg.norm(expected_grad) < 2e-2


@pytest.mark.parametrize("native", [True, False])
def test_a_bfloat16_corpus_on_a_cpu_is_placed_as_its_bits_and_never_widened_whole(monkeypatch, native):
    """XLA's CPU backend would convert a whole bfloat16 corpus to float32 ahead of the scan; placed as uint16
    bit patterns, chunks are read back inside the scan — as bfloat16, or widened exactly (the bits are the
    float32's high half) — so either way the compiled step's scratch memory is far below even one float32 copy
    of the corpus."""
    from esep_jax.objectives import corpus_softmax
    from esep_jax.objectives.corpus_softmax import widen

    monkeypatch.setattr(corpus_softmax, "native_bfloat16_dots", lambda: native)
    values = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.bfloat16)
    np.testing.assert_array_equal(widen(jax.lax.bitcast_convert_type(values, jnp.uint16)), values.astype(jnp.float32))
    mesh = make_data_corpus_mesh(1)
    _, corpus, ids, weights = _inputs(seed=2, docs=65536, dim=64)
    sharded = ShardedCorpus(corpus, mesh, chunk=1024, dtype=jnp.bfloat16)
    assert sharded.embeddings.dtype == jnp.uint16 and sharded.nbytes == corpus.size * 2
    np.testing.assert_array_equal(widen(sharded.embeddings[:5]), jnp.asarray(corpus[:5], jnp.bfloat16).astype(jnp.float32))
    loss = make_corpus_softmax_loss(mesh, temperature=0.05, chunk=1024)
    queries = jnp.zeros((256, 64), jnp.float32)
    step = jax.jit(jax.grad(lambda q: loss(q, sharded, jnp.asarray(ids[:1].repeat(256, 0)),
                                            jnp.asarray(weights[:1].repeat(256, 0))).sum()))
    scratch = step.lower(queries).compile().memory_analysis().temp_size_in_bytes
    assert scratch < 0.25 * corpus.size * 4, scratch  # a widened copy of the corpus would be corpus.size * 4


def test_large_logits_stay_finite():
    queries, corpus, ids, weights = _inputs(seed=4)
    loss, grad = _blockwise(queries * 1e3, corpus, ids, weights, 0.01, 5)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()


def _climbing(sign=1.0):
    """Queries at a low temperature over a corpus whose first chunk (5 rows, or all 60) is orthogonal to them
    and whose later rows are aligned with them (sign 1: scores ~ +300 above the first chunk's max, whose terms
    overflow float32) or against them behind a masked-out first chunk (sign −1: every score near −300, whose
    terms underflow against a shift of 0)."""
    rng = np.random.default_rng(9)
    direction = np.zeros(8)
    direction[7] = 1.0
    corpus = rng.normal(size=(60, 8)) * 0.05
    corpus[:5, 7] = 0.0
    corpus[5:, 7] = 3.0
    queries = (sign * direction + 0.1 * rng.normal(size=(6, 8))).astype(np.float32)
    ids = rng.integers(5, 60, size=(6, 3)).astype(np.int32)
    mask = np.ones(60, bool)
    if sign < 0:
        mask[:5] = False
    return queries, corpus.astype(np.float32), ids, np.ones((6, 3), np.float32), mask


def test_the_shift_is_fixed_after_the_first_chunk_unless_sums_overflow_or_underflow(monkeypatch):
    """The scan fixes each row's shift at its max over the first chunk; only blocks whose sums overflow (later
    scores far above it) or underflow (a masked first chunk, every score far below 0) are rescanned with a
    running max — alone when they are few. With the rescan replaced by NaNs, ordinary inputs — and the climbing
    corpus scanned as one chunk — still give the plain loss (no rescan), the climbing corpora in chunks of 5
    give NaN (rescan), and in a batch where 2 of 64 rows climb only those 2 are NaN; unpatched, every case is
    exact."""
    from esep_jax.objectives import corpus_softmax

    ordinary = _inputs()
    expected_ordinary = _reference(*ordinary, 0.07)
    climbing = {sign: _climbing(sign) for sign in (1.0, -1.0)}
    # 64 rows of which 2 climb (at most 1/RESCAN_FRACTION of them): only those 2 are rescanned.
    queries, corpus, ids, weights, mask = _climbing(1.0)
    rng = np.random.default_rng(4)
    flat = (0.1 * rng.normal(size=(64, 8))).astype(np.float32)
    flat[:, 7] = 0.0
    flat[:2] = queries[:2]
    mixed = (flat, corpus, rng.integers(5, 60, size=(64, 3)).astype(np.int32), np.ones((64, 3), np.float32), mask)
    expected_mixed = _reference(*mixed[:4], 0.01, mask)
    loss, grad = _blockwise(*mixed[:4], 0.01, 5, mask)
    np.testing.assert_allclose(loss, expected_mixed[0], rtol=1e-5)
    np.testing.assert_allclose(grad, expected_mixed[1], rtol=1e-4, atol=1e-4)
    expected = {sign: _reference(*case[:4], 0.01, case[4]) for sign, case in climbing.items()}
    for sign, case in climbing.items():
        for chunk in (5, 64):
            loss, grad = _blockwise(*case[:4], 0.01, chunk, case[4])
            np.testing.assert_allclose(loss, expected[sign][0], rtol=1e-5)
            np.testing.assert_allclose(grad, expected[sign][1], rtol=1e-4, atol=1e-4)

    def poisoned(queries, blocks, block_biases, live):
        nan = jnp.full((queries.shape[0],), jnp.nan, jnp.float32)
        return jax.lax.pcast((nan, nan, jnp.full((queries.shape[0], blocks.shape[2]), jnp.nan, jnp.float32)),
                             ("data", "corpus"), to="varying")

    monkeypatch.setattr(corpus_softmax, "_scan_rows_with_running_max", poisoned)
    loss, grad = _blockwise(*ordinary, 0.07, 8)
    np.testing.assert_allclose(loss, expected_ordinary[0], rtol=1e-5)
    np.testing.assert_allclose(grad, expected_ordinary[1], rtol=1e-5, atol=1e-6)
    loss, _ = _blockwise(*climbing[1.0][:4], 0.01, 64, climbing[1.0][4])
    np.testing.assert_allclose(loss, expected[1.0][0], rtol=1e-5)
    for case in climbing.values():
        assert np.isnan(_blockwise(*case[:4], 0.01, 5, case[4])[0]).all()
    loss, _ = _blockwise(*mixed[:4], 0.01, 5, mask)
    assert np.isnan(loss[:2]).all()
    np.testing.assert_allclose(loss[2:], expected_mixed[0][2:], rtol=1e-5)
