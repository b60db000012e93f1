"""A kill -9 at chosen moments — right after each checkpoint commits, and during the final summary — then a
rerun, ends exactly like an uninterrupted run: parameters, metrics.jsonl and summary.json, for patience 1 as
well as large (`ESEP_FAULT`, esep_jax/training/faults.py, makes the trainer kill itself at such a moment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_states_equal, final_train_state
from esep_jax.cli import main

SHORT = ["--config.train.num_steps=40", "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
         "--config.loss.negatives=judged", "--config.loss.temperature=0.02", "--no-progress"]
KILL_POINTS = ["checkpoint:0", "checkpoint:10", "checkpoint:20", "checkpoint:30", "checkpoint:40", "summary"]


def _run(dataset: str, workdir: Path, patience: int, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ESEP_FAULT"}
    if fault:
        env["ESEP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "esep_jax", "train", "--data", dataset, "--workdir", str(workdir),
                           *SHORT, f"--config.train.patience={patience}"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _outcome(workdir: Path):
    step, state = final_train_state(workdir)
    return step, state, (workdir / "metrics.jsonl").read_text(), json.loads((workdir / "summary.json").read_text())


@pytest.mark.parametrize("patience", [1, 100])
def test_a_kill_after_every_checkpoint_and_in_the_summary_changes_nothing(demo_dataset, tmp_path, patience):
    reference = tmp_path / "reference"
    assert _run(demo_dataset, reference, patience).returncode == 0
    expected = _outcome(reference)
    workdir = tmp_path / "killed"
    kills = 0
    for point in KILL_POINTS:  # one workdir, killed at every point in turn (a point never reached is skipped)
        result = _run(demo_dataset, workdir, patience, fault=point)
        kills += result.returncode == -signal.SIGKILL
        assert result.returncode in (0, -signal.SIGKILL), result.stderr
    assert _run(demo_dataset, workdir, patience).returncode == 0
    step, state, metrics, summary = _outcome(workdir)
    assert kills >= (3 if patience == 1 else len(KILL_POINTS))
    assert step == expected[0]
    assert_states_equal(state, expected[1])
    assert metrics == expected[2]  # no line lost or written twice (the step-0 dev line included)
    # Wall-clock timings are the one field that differs: they describe the process that wrote the summary
    # (one resumed only to write it has no steps to time).
    assert summary.pop("timings")["total_s"] >= 0 and expected[3].pop("timings")["total_s"] >= 0
    assert summary == expected[3]
    assert sum(json.loads(line)["kind"] == "dev" and json.loads(line)["step"] == 0 for line in metrics.splitlines()) == 1


def test_patience_one_after_a_kill_at_checkpoint_zero_still_trains(demo_dataset, tmp_path, capsys):
    """The probe: killed right after checkpoint 0, a patience-1 rerun used to re-evaluate step 0, count it as no
    improvement, stop and ship the identity head with exit 0."""
    workdir = tmp_path / "run"
    assert _run(demo_dataset, workdir, 1, fault="checkpoint:0").returncode == -signal.SIGKILL
    assert _run(demo_dataset, workdir, 1).returncode == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_step"] > 0 and summary["best_dev"]["ndcg@10"] > summary["base_dev"]["ndcg@10"]


def test_a_damaged_newest_checkpoint_of_a_crashed_run_is_detected(demo_dataset, tmp_path, capsys):
    """Killed right after checkpoint 20 committed, then a bit flipped in it: the rerun detects it from the digest
    committed with the checkpoint, moves it aside, resumes from checkpoint 10 and ends like a clean run."""
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    assert _run(demo_dataset, reference, 100).returncode == 0
    assert _run(demo_dataset, workdir, 100, fault="checkpoint:20").returncode == -signal.SIGKILL
    array = max((p for p in (workdir / "checkpoints" / "20").rglob("*") if p.is_file() and "/d/" in str(p)),
                key=lambda p: p.stat().st_size)
    data = bytearray(array.read_bytes())
    data[len(data) // 2] ^= 0x04
    array.write_bytes(bytes(data))
    result = _run(demo_dataset, workdir, 100)
    assert result.returncode == 0
    assert "checkpoint at step 20 is damaged (its contents differ from the digest" in result.stderr
    assert "resuming from step 10" in result.stderr
    assert_states_equal(final_train_state(workdir)[1], final_train_state(reference)[1])


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(demo_dataset, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", "--data", demo_dataset, "--workdir", str(workdir), *SHORT, "--stop-at-step", "10"]) == 0
    for digest in (workdir / "checkpoints").glob("*/digest/*"):
        digest.write_text("{not json")
    capsys.readouterr()
    assert main(["train", "--data", demo_dataset, "--workdir", str(workdir), *SHORT]) == 2
    error = capsys.readouterr().err
    assert "every checkpoint is damaged" in error and error.count("\n") == 1
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["0", "10"]


def test_a_damaged_last_metrics_line_is_reported_and_its_dev_record_rewritten(demo_dataset, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--data", demo_dataset, "--workdir", str(workdir), *SHORT]
    assert main(args) == 0
    log = workdir / "metrics.jsonl"
    complete = log.read_text()
    log.write_text(complete[:-40])  # the final dev record torn
    capsys.readouterr()
    assert main(args) == 0
    assert f"{log}: line {complete.count(chr(10))} is damaged and was dropped" in capsys.readouterr().err
    assert log.read_text() == complete
