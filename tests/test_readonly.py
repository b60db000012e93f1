"""Read-only commands never write into a run, and the step and the evaluation compile once."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from esep_jax.cli import main

FAST = ["--config.train.num_steps=30", "--config.train.eval_every=10", "--config.train.batch_size=32",
        "--config.optim.weight_decay=1e-4", "--no-progress"]


def _snapshot(root: Path) -> dict:
    """Every path under `root` with its kind, size, mtime (ns) and content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("readonly") / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0
    return workdir


def test_eval_export_mine_and_drift_leave_the_workdir_byte_and_mtime_identical(finished_run, synthetic_dataset,
                                                                                tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)  # mine writes candidates into the dataset, never the workdir
    before = _snapshot(finished_run)
    assert main(["eval", "--data", str(data), "--workdir", str(finished_run), "--json", str(tmp_path / "m.json")]) == 0
    assert main(["export", "--workdir", str(finished_run), "--data", str(data), "--out", str(tmp_path / "b")]) == 0
    assert main(["mine", "--data", str(data), "--name", "hard", "--k", "4", "--workdir", str(finished_run)]) == 0
    assert main(["drift", "--data", str(data), "--workdir", str(finished_run)]) == 0
    assert _snapshot(finished_run) == before


def test_a_workdir_without_checkpoints_is_one_clean_error_and_gains_nothing(finished_run, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    shutil.rmtree(workdir / "checkpoints")
    before = _snapshot(workdir)
    capsys.readouterr()
    assert main(["eval", "--data", json.loads((workdir / "run.json").read_text())["data"],
                 "--workdir", str(workdir)]) == 2
    error = capsys.readouterr().err
    assert "no checkpoints" in error and error.count("\n") == 1 and "Traceback" not in error
    assert _snapshot(workdir) == before and not (workdir / "checkpoints").exists()
    assert main(["export", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "nothing").exists()


def _compilations(args: list[str]) -> int:
    """Backend compilations of one CLI command in a fresh process."""
    code = ("import sys\nfrom jax import monitoring\ncount = [0]\n"
            "def listen(name, duration, **kwargs):\n"
            "    count[0] += name == '/jax/core/compile/backend_compile_duration'\n"
            "monitoring.register_event_duration_secs_listener(listen)\n"
            f"from esep_jax.cli import main\nassert main({args!r}) == 0\nprint('COMPILES', count[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300).stdout
    return int(out.rsplit("COMPILES", 1)[1])


@pytest.mark.slow
def test_the_step_and_the_evaluation_compile_once(synthetic_dataset, tmp_path):
    """Three times the steps and the dev evaluations compile exactly as much: nothing recompiles per step or
    per evaluation (a recompiling step would show up as a count that grows with the run)."""
    short = _compilations(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "a"), *FAST])
    long = _compilations(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "b"), *FAST,
                          "--config.train.num_steps=90"])
    assert short == long
    one = _compilations(["eval", "--data", synthetic_dataset, "--split", "dev", "--workdir", str(tmp_path / "a")])
    assert one == _compilations(["eval", "--data", synthetic_dataset, "--split", "test", "--workdir",
                                 str(tmp_path / "a")])
