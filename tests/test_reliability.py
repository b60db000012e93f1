"""Crashes, corruption, full disks, concurrent trainers and non-finite losses lose nothing already saved."""

from __future__ import annotations

import ast
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_states_equal, final_train_state
from esep_jax.cli import main

# Long enough to be killed mid-run, short enough for CI: ~150 steps on the demo data with frequent saves.
RUN = ["--config.train.num_steps=150", "--config.train.eval_every=50", "--config.train.checkpoint_every=10",
       "--config.train.patience=100", "--config.loss.negatives=judged", "--no-progress"]
# Random kills complement the deterministic kill points of test_crash_recovery.py (mid-step, mid-save moments).
KILL_TRIALS = int(os.environ.get("ESEP_KILL_TRIALS", "5"))


def _train_args(dataset: str, workdir: Path, *extra: str) -> list[str]:
    return ["train", "--data", dataset, "--workdir", str(workdir), *RUN, *extra]


def _subprocess(args: list[str], preamble: str = "", **kwargs) -> subprocess.Popen:
    code = f"import sys\n{preamble}\nfrom esep_jax.cli import main\nsys.exit(main({args!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def reference(demo_dataset, tmp_path_factory):
    """An uninterrupted run: (workdir, final state)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    assert main(_train_args(demo_dataset, workdir)) == 0
    return workdir, final_train_state(workdir, demo_dataset)


@pytest.mark.slow
def test_kill_minus_nine_at_random_points_then_resume_is_bitwise_equal(demo_dataset, reference, tmp_path):
    """Runs are killed at random moments and restarted until they finish; fresh runs are started until
    KILL_TRIALS kills have happened. Every finished run must equal the uninterrupted one bit for bit."""
    rng = np.random.default_rng(2026)
    killed, progress, runs = 0, [], 0
    deadline = time.monotonic() + 150
    while killed < KILL_TRIALS and time.monotonic() < deadline:
        runs += 1
        workdir = tmp_path / f"run{runs}"
        while True:
            process = _subprocess(_train_args(demo_dataset, workdir))
            time.sleep(rng.uniform(1.0, 6.0))  # lands in start-up, restore, training, evaluation or a save
            if process.poll() is not None:
                assert process.returncode == 0, process.stderr.read()
                break  # finished before the kill
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed += 1
            saved = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
            progress.append(max(saved, default=-1))
        step, state = final_train_state(workdir, demo_dataset)
        assert step == reference[1][0] == 150
        assert_states_equal(state, reference[1][1])
    print(f"{killed} kills over {runs} runs; newest checkpoint at each kill: {progress}")
    assert killed >= KILL_TRIALS
    assert any(0 < step < 150 for step in progress), progress  # kills landed mid-training


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(demo_dataset, reference, tmp_path, capsys, damage):
    workdir = tmp_path / "run"
    assert main(_train_args(demo_dataset, workdir, "--stop-at-step", "40")) == 0
    newest = max(glob.glob(str(workdir / "checkpoints" / "40" / "**" / "d" / "*"), recursive=True),
                 key=os.path.getsize)
    data = bytearray(Path(newest).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 3]
    Path(newest).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_train_args(demo_dataset, workdir)) == 0
    expected = "its contents differ from the digest" if damage == "flip" else "a file does not read back"
    assert f"checkpoint at step 40 is damaged ({expected}" in capsys.readouterr().err
    assert list((workdir / "corrupted_checkpoints").iterdir())
    step, state = final_train_state(workdir, demo_dataset)
    assert step == 150
    assert_states_equal(state, reference[1][1])


def test_non_finite_loss_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(synthetic_dataset, tmp_path,
                                                                                       capsys):
    workdir = tmp_path / "run"
    # A temperature this small overflows the logits to inf, and inf − inf is NaN.
    code = main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), "--no-progress",
                 "--config.loss.temperature=1e-38", "--config.train.log_every=5", "--config.train.batch_size=32"])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert "non-finite loss between steps 1 and 5" in error and "\n" not in error
    step, state = final_train_state(workdir, synthetic_dataset)
    assert step == 0 and all(np.isfinite(np.asarray(leaf)).all() for leaf in __import__("jax").tree.leaves(state))


def test_a_second_trainer_on_the_same_workdir_is_refused(demo_dataset, tmp_path):
    workdir = tmp_path / "run"
    first = _subprocess(_train_args(demo_dataset, workdir))
    deadline = time.monotonic() + 60
    while not (workdir / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "esep_jax", *_train_args(demo_dataset, workdir)],
                            capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 2
    assert "in use by another trainer" in second.stderr and second.stderr.count("\n") == 1
    assert first.wait(timeout=300) == 0
    assert final_train_state(workdir, demo_dataset)[0] == 150


def test_full_disk_during_a_checkpoint_is_a_clear_error_and_loses_nothing(demo_dataset, reference, tmp_path):
    workdir = tmp_path / "run"
    assert main(_train_args(demo_dataset, workdir, "--stop-at-step", "20")) == 0
    # RLIMIT_FSIZE makes every write past 300 kB fail as a full disk would (EFBIG instead of ENOSPC).
    preamble = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))")
    process = _subprocess(_train_args(demo_dataset, workdir), preamble=preamble)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("esep-jax: error: could not write a checkpoint") and "File too large" in last
    assert final_train_state(workdir, demo_dataset)[0] == 20  # the earlier checkpoints are intact
    assert main(_train_args(demo_dataset, workdir)) == 0  # with space again, the run completes
    assert_states_equal(final_train_state(workdir, demo_dataset)[1], reference[1][1])


def test_no_pickle_anywhere_in_the_package():
    """No module imports pickle-like loaders, and every np.load passes allow_pickle=False."""
    for path in (REPO / "esep_jax").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "dill", "joblib", "cloudpickle"} & {n.split(".")[0] for n in names}, path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = getattr(node.func.value, "id", "")
                if owner in ("np", "numpy"):
                    flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                    assert flags.get("allow_pickle") is False, f"{path}:{node.lineno} np.load without allow_pickle=False"
                assert owner != "torch", f"{path}:{node.lineno} torch.load"


def test_full_disk_during_export_is_a_clear_error_and_leaves_nothing(demo_dataset, reference, tmp_path):
    out = tmp_path / "bundle"
    preamble = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))")
    process = _subprocess(["export", "--workdir", str(reference[0]), "--out", str(out)], preamble=preamble)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("esep-jax: error: could not write the bundle") and "nothing was left behind" in last
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]
    assert final_train_state(reference[0], demo_dataset)[0] == 150  # the run it exported from is untouched
