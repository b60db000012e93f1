"""The loader: batches are a pure function of (seed, step), cover every query once per epoch, and shard."""

from __future__ import annotations

import numpy as np
import pytest

from esep_jax.data.dataset import Dataset
from esep_jax.data.loader import TrainBatches


def _batches(dataset_path, **overrides):
    dataset = Dataset(dataset_path)
    options = dict(batch_size=16, max_positives=8, seed=3)
    options.update(overrides)
    return dataset, TrainBatches(dataset, dataset.qrels("train"), **options)


def test_batch_is_a_function_of_step(synthetic_dataset):
    _, first = _batches(synthetic_dataset)
    _, second = _batches(synthetic_dataset)
    streamed = dict(first.iterate(5, 12))
    assert sorted(streamed) == list(range(5, 12))
    for step in (11, 5, 7):  # any order, any instance
        expected = second.batch_at(step)
        for name in expected:
            np.testing.assert_array_equal(streamed[step][name], expected[name])


def test_each_epoch_visits_every_query_once(synthetic_dataset):
    _, batches = _batches(synthetic_dataset, batch_size=10)
    n = batches.num_queries
    positions = np.concatenate([batches.indices_at(s) for s in range(3 * n // 10 + 1)])
    for epoch in range(3):
        assert sorted(positions[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(positions[:n], positions[n:2 * n])  # a fresh order each epoch


def test_batches_hold_the_right_queries_and_positives(synthetic_dataset):
    dataset, batches = _batches(synthetic_dataset)
    qrels = dataset.qrels("train")
    batch = batches.batch_at(4)
    indices = batches.indices_at(4)
    np.testing.assert_array_equal(batch["queries"], dataset.read_queries(qrels.query_rows[indices]))
    for row, index in enumerate(indices):
        docs, grades = qrels.judgements(int(np.flatnonzero(qrels.query_rows == batches.query_rows[index])[0]))
        got = {(d, w) for d, w in zip(batch["positive_ids"][row], batch["positive_weights"][row]) if d >= 0}
        assert got == {(d, float(g)) for d, g in zip(docs, grades) if g >= 1}


def test_positive_cap_samples_without_padding_leaks(synthetic_dataset):
    _, batches = _batches(synthetic_dataset, max_positives=2)
    batch = batches.batch_at(0)
    assert batch["positive_ids"].shape[1] == 2
    # Rows with one positive are padded, rows with more are sampled down; none is empty.
    assert ((batch["positive_ids"] >= 0).sum(axis=1) >= 1).all()
    assert (batch["positive_weights"][batch["positive_ids"] < 0] == 0).all()


@pytest.mark.parametrize("shards", [2, 4])
def test_shards_partition_the_global_batch(synthetic_dataset, shards):
    dataset, whole = _batches(synthetic_dataset)
    parts = [TrainBatches(dataset, dataset.qrels("train"), batch_size=16, max_positives=8, seed=3,
                          shard_index=i, shard_count=shards).indices_at(6) for i in range(shards)]
    np.testing.assert_array_equal(np.concatenate(parts), whole.indices_at(6))
