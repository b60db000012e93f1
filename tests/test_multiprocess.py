"""Multi-process training on JAX's distributed runtime (gloo on CPU): same result as one process, a dead
peer fails the job instead of hanging it, and SIGTERM checkpoints and exits for an exact relaunch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_states_equal, final_train_state

RUN = ["--config.train.num_steps=30", "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
       "--config.train.batch_size=32", "--config.train.patience=100", "--config.optim.learning_rate=1e-2", "--config.optim.weight_decay=1e-4",
       "--no-progress"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _launch(dataset: str, workdir: Path, devices: int, extra=(), process=None, processes=None, port=None):
    args = [sys.executable, "-m", "esep_jax", "train", "--data", dataset, "--workdir", str(workdir), *RUN, *extra]
    if processes:
        args += ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(process),
                 "--heartbeat-timeout", "10"]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
    # Output goes to files, not pipes: a child that writes more than a pipe holds while nobody reads would block.
    log = workdir.parent / f"{workdir.name}-{process or 0}.log"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w+")
    child = subprocess.Popen(args, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True)
    child.output = lambda: log.read_text()
    return child


def _one_process_then_two(dataset: str, tmp_path: Path, single_devices: int, devices_each: int,
                          extra: list[str] = ()) -> list[dict]:
    """Trains in `single/` with one process, then in `multi/` with two; asserts their final train states are
    equal and returns both summaries (single, multi)."""
    single = _launch(dataset, tmp_path / "single", single_devices, extra)
    assert single.wait(timeout=300) == 0, single.output()
    port = _free_port()
    workers = [_launch(dataset, tmp_path / "multi", devices_each, extra, process=i, processes=2, port=port)
               for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.output()[-3000:]
    (step_a, a), (step_b, b) = (final_train_state(tmp_path / name, dataset) for name in ("single", "multi"))
    assert step_a == step_b == 30
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    return [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("single", "multi")]


def test_two_processes_of_two_devices_equal_one_process_of_four(synthetic_dataset, tmp_path):
    summaries = _one_process_then_two(synthetic_dataset, tmp_path, 4, 2)
    for name, value in summaries[0]["best_dev"].items():
        assert summaries[1]["best_dev"][name] == pytest.approx(value, abs=1e-6)
    # Only process 0 writes the run's files: one line per logged step.
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len({(r["step"], r["kind"]) for r in records})


def test_a_dead_process_fails_the_job_within_bounded_time(synthetic_dataset, tmp_path):
    port = _free_port()
    workers = [_launch(synthetic_dataset, tmp_path / "run", 2, ["--config.train.num_steps=100000",
                                                                 "--config.train.eval_every=100000"],
                       process=i, processes=2, port=port) for i in range(2)]
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "0").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    workers[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    try:
        code = workers[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        workers[0].kill()
        pytest.fail("the surviving process hung after its peer died")
    assert code != 0
    assert time.monotonic() - started < 90
    stderr = workers[0].output()
    # Whichever notices first names the failure: the coordination service's heartbeat, or gloo itself
    # aborting a collective whose peer died mid-transfer ("enforce fail ... Received data size doesn't match").
    assert any(word in stderr.lower() for word in ("heartbeat", "unavailable", "connection", "terminated",
                                                   "failed", "error", "enforce fail")), stderr[-2000:]


def test_sigterm_checkpoints_and_a_relaunch_ends_identical(synthetic_dataset, tmp_path):
    reference = _launch(synthetic_dataset, tmp_path / "reference", 1, ["--config.train.num_steps=400"])
    assert reference.wait(timeout=300) == 0
    run = _launch(synthetic_dataset, tmp_path / "run", 1, ["--config.train.num_steps=400"])
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "10").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert run.wait(timeout=60) == 0
    assert time.monotonic() - started < 30  # promptly
    stdout = run.output()
    assert "rerun the same command to resume" in stdout or "steps 400" in stdout
    relaunch = _launch(synthetic_dataset, tmp_path / "run", 1, ["--config.train.num_steps=400"])
    assert relaunch.wait(timeout=300) == 0
    (step_a, a), (step_b, b) = (final_train_state(tmp_path / name, synthetic_dataset) for name in ("reference", "run"))
    assert step_a == step_b == 400
    assert_states_equal(a, b)


def test_launch_script_runs_a_two_process_job_from_a_file_url(synthetic_dataset, tmp_path):
    """launch/multiprocess_cpu.sh, with the dataset given as a URL: the kvstore path cloud URLs take too."""
    done = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "2", "1",
                           "--data", f"file://{synthetic_dataset}", "--workdir", str(tmp_path / "run"), *RUN],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_train_state(tmp_path / "run", synthetic_dataset)[0] == 30
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == f"file://{synthetic_dataset}"


def test_a_corpus_sharded_over_two_processes_trains_and_evaluates_like_one(synthetic_dataset, tmp_path):
    """corpus_shards=2 over 2 processes of 1 device: each process reads and holds only its half of the corpus —
    for training and for the dev evaluations (top-k per shard, merged exactly) — and the run equals one process
    of 2 devices with the same mesh."""
    summaries = _one_process_then_two(synthetic_dataset, tmp_path, 2, 1, ["--config.train.corpus_shards=2"])
    assert summaries[1]["best_dev"]["ndcg@10"] == pytest.approx(summaries[0]["best_dev"]["ndcg@10"], abs=1e-6)
    corpus_bytes = 400 * 16 * 4  # the synthetic corpus in float32
    assert summaries[0]["corpus_bytes_per_process"] == [corpus_bytes]  # one process: all of it
    assert summaries[1]["corpus_bytes_per_process"] == [corpus_bytes // 2] * 2  # two: half each
