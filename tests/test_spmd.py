"""The sharded step gives the same loss, gradients and parameters on 1, 2, 4 and 8 devices, for every
(data, corpus) factorisation, with and without micro-batching — and a 65,536-query batch in micro-batches
equals it processed whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from esep_jax.config import Config
from esep_jax.corpus_softmax import ShardedCorpus, make_data_corpus_mesh
from esep_jax.models.heads import build_head
from esep_jax.train.step import create_state, make_optimizer, make_train_step

WORKER = Path(__file__).with_name("spmd_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    directory = tmp_path_factory.mktemp("spmd")
    for devices in (1, 2, 4, 8):
        path = directory / f"{devices}.npz"
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
        subprocess.run([sys.executable, str(WORKER), str(path)], env=env, check=True, timeout=300)
        out[devices] = dict(np.load(path))
    return out


def _by_layout(results):
    for devices, values in results.items():
        layouts = sorted({key.split(":")[0] for key in values})
        assert len(layouts) == {1: 1, 2: 2, 4: 3, 8: 4}[devices]
        for layout in layouts:
            yield layout, {key.split(":", 1)[1]: v for key, v in values.items() if key.startswith(layout + ":")}


def test_every_layout_matches_one_device(results):
    reference = {key.split(":", 1)[1]: value for key, value in results[1].items()}
    for layout, values in _by_layout(results):
        assert values.keys() == reference.keys()
        for name, value in values.items():
            np.testing.assert_allclose(value, reference[name], rtol=1e-5, atol=1e-6, err_msg=f"{layout} {name}")


def test_micro_batching_matches_whole_batch(results):
    for layout, values in _by_layout(results):
        for name, value in values.items():
            if name.startswith("micro8/"):
                np.testing.assert_allclose(value, values[name.replace("micro8/", "micro0/")], rtol=1e-5,
                                           atol=1e-6, err_msg=f"{layout} {name}")


def test_a_65536_query_batch_in_micro_batches_equals_one_batch():
    batch, docs, dim = 65536, 512, 16
    rng = np.random.default_rng(0)
    corpus = (rng.normal(size=(docs, dim)) / 4).astype(np.float32)
    data = {"queries": rng.normal(size=(batch, dim)).astype(np.float32),
            "positive_ids": rng.integers(0, docs, size=(batch, 2)).astype(np.int32),
            "positive_weights": np.ones((batch, 2), np.float32)}
    mesh = make_data_corpus_mesh(1)
    sharded = ShardedCorpus(corpus, mesh, chunk=128)
    params = {}
    for micro in (0, 4096):
        config = Config()
        config.train.batch_size, config.train.micro_batch_size, config.train.corpus_chunk = batch, micro, 128
        head = build_head(config.model, dim)
        optimizer, schedule = make_optimizer(config.optim, 10)
        step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh))
        state, metrics = step(create_state(head, optimizer, 0, dim), data, (sharded.embeddings, sharded.mask))
        params[micro] = (np.asarray(state.opt_state[1].mu["residual"]["kernel"]), float(metrics["loss"][0]))
    np.testing.assert_allclose(params[4096][0], params[0][0], rtol=1e-4, atol=1e-7)
    assert params[4096][1] == pytest.approx(params[0][1], rel=1e-5)
