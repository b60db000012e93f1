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

from esep_jax.config import Config, override
from esep_jax.objectives.corpus_softmax import ShardedCorpus, make_data_corpus_mesh
from esep_jax.objectives import build_terms
from esep_jax.runs.state import run_components
from esep_jax.training.step import make_train_step

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
        config = override(Config(), {"train.batch_size": batch, "train.micro_batch_size": micro,
                                     "train.corpus_chunk": 128, "train.num_steps": 10})
        head, optimizer, schedule, fresh_state = run_components(config, dim, dim)
        step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, build_terms(config)))
        state, metrics = step(fresh_state(), data, {"corpus": (sharded.embeddings, sharded.logit_bias)})
        params[micro] = (np.asarray(state.opt_state[1].mu["residual"]["kernel"]), float(metrics["loss"][0]))
    np.testing.assert_allclose(params[4096][0], params[0][0], rtol=1e-4, atol=1e-7)
    assert params[4096][1] == pytest.approx(params[0][1], rel=1e-5)
