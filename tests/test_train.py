"""Training end to end on synthetic data: it learns, keeps the best on dev, logs, and resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import final_train_state
from esep_jax.cli import main

FAST = ["--config.optim.weight_decay=1e-4", "--config.train.num_steps=60", "--config.train.eval_every=20", "--config.train.checkpoint_every=20",
        "--config.train.batch_size=32", "--config.train.log_every=10", "--config.optim.warmup_steps=5",
        "--config.train.patience=100", "--no-progress"]


@pytest.mark.parametrize("loss, head", [("full_corpus", "linear"), ("in_batch", "lowrank"), ("full_corpus", "mlp")])
def test_training_beats_base_and_writes_run_files(synthetic_dataset, tmp_path, capsys, loss, head):
    workdir = tmp_path / "run"
    args = ["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST,
            f"--config.loss.kind={loss}", f"--config.model.head={head}", "--config.optim.learning_rate=1e-2", "--config.optim.weight_decay=1e-4",
            "--config.loss.recovery_weight=0.1", "--config.train.num_steps=100"]
    assert main(args) == 0
    assert json.loads((workdir / "config.json").read_text())["model"]["head"] == head
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "dev"}
    assert [r["step"] for r in records if r["kind"] == "dev"] == [0, 20, 40, 60, 80, 100]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_dev"]["ndcg@10"] > summary["base_dev"]["ndcg@10"] + 0.01

    capsys.readouterr()
    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--workdir", str(workdir),
                 "--json", str(tmp_path / "test.json"), "--run", str(tmp_path / "test.run")]) == 0
    result = json.loads((tmp_path / "test.json").read_text())
    assert {"ndcg@10", "mrr@10", "recall@100", "map@100"} <= set(result)
    assert result["ndcg@10"] == result["head"]["ndcg@10"] > result["base"]["ndcg@10"] + 0.01
    first = (tmp_path / "test.run").read_text().splitlines()[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1"


def test_early_stopping_keeps_the_best_dev_head(synthetic_dataset, tmp_path):
    workdir = tmp_path / "run"
    # A learning rate this high, kept constant, wrecks the head; the identity (step 0) must be kept.
    args = ["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST, "--config.optim.learning_rate=500", "--config.optim.weight_decay=1e-4",
            "--config.optim.end_learning_rate_fraction=1", "--config.optim.grad_clip_norm=0",
            "--config.train.patience=2", "--config.loss.recovery_weight=0"]
    assert main(args) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 40
    assert summary["best_step"] == 0 and summary["best_dev"] == summary["base_dev"]
    dev = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = max((r["ndcg@10"], -r["step"]) for r in dev if r["kind"] == "dev")
    assert summary["best_step"] == -best[1]
    assert main(args) == 0  # rerunning a finished run does not train further
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 40


def test_interrupted_run_resumes_to_identical_parameters(synthetic_dataset, tmp_path):
    base = ["train", "--data", synthetic_dataset, *FAST, "--config.loss.kind=in_batch", "--config.model.head=mlp",
            "--config.model.dropout=0.1"]
    assert main([*base, "--workdir", str(tmp_path / "straight")]) == 0
    assert main([*base, "--workdir", str(tmp_path / "resumed"), "--stop-at-step", "33"]) == 0
    step, _ = final_train_state(tmp_path / "resumed", synthetic_dataset)
    assert step == 33
    assert main([*base, "--workdir", str(tmp_path / "resumed")]) == 0
    (step_a, a), (step_b, b) = (final_train_state(tmp_path / name, synthetic_dataset) for name in ("straight", "resumed"))
    assert step_a == step_b == 60
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    dev_lines = [line for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines() if '"dev"' in line]
    assert len(dev_lines) == 4  # the resumed log reads as one run: no duplicated evaluations


def test_workdir_refuses_a_different_config(synthetic_dataset, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(["train", "--data", synthetic_dataset, "--workdir", workdir, *FAST, "--stop-at-step", "5"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", synthetic_dataset, "--workdir", workdir, *FAST,
                 "--config.loss.temperature=0.5"]) == 2
    assert "loss.temperature: 0.03 -> 0.5" in capsys.readouterr().err


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ingest", "train", "eval"))
    for command in ("ingest", "train", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--" in capsys.readouterr().out


def _read_events(directory: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event directory (TFRecord framing, read by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.append((value.tag, event.step, value.simple_value))
    return scalars


def test_every_run_writes_tensorboard_events_and_training_curves(synthetic_dataset, tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST,
                 "--config.ensemble.members=2", "--config.ensemble.temperature=0.03,0.1"]) == 0
    scalars = _read_events(workdir / "events")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_losses = {(r["step"], m): v for r in records if r["kind"] == "train" for m, v in enumerate(r["member_loss"])}
    logged = {(step, int(tag.rsplit("member", 1)[1])): value for tag, step, value in scalars
              if tag.startswith("train/member_loss/")}
    assert logged == pytest.approx(train_losses)
    dev = {(r["step"], r["member"]): r["ndcg@10"] for r in records if r["kind"] == "dev"}
    assert {(step, int(tag.split("/")[1][6:])): value for tag, step, value in scalars
            if tag.startswith("dev/member") and tag.count("/") == 2 and tag.endswith("/ndcg_10")
            } == pytest.approx(dev)  # TensorBoard tags write "@" as "_"
    assert (workdir / "train_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_event_files_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed (a second of start-up); the run's writer refuses
    that one import and lets torch be imported normally afterwards."""
    code = f"""
import importlib.util, sys
from pathlib import Path
from esep_jax.training.metrics_log import MetricsLog
log = MetricsLog(Path({str(tmp_path)!r}) / "metrics.jsonl", events=Path({str(tmp_path)!r}) / "events")
log.write(3, "train", {{"loss": 1.5}})
log.close()
assert "torch" not in sys.modules
if importlib.util.find_spec("torch") is not None:
    import torch
    assert torch.zeros(2).sum().item() == 0.0
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ("train/loss", 3, 1.5) in _read_events(tmp_path / "events")


@pytest.mark.parametrize("loss", ["full_corpus", "in_batch"])
def test_a_task_table_of_only_the_contrasted_documents_trains_exactly_like_the_whole_corpus(
        tmp_path, monkeypatch, loss):
    """With `loss.negatives=judged` and few judged documents, the task's corpus table holds only those (the
    rest would add −inf logits): the same losses and parameters as placing every row, dev still retrieving
    from the whole corpus."""
    from conftest import ingest_args, write_synthetic_sources
    from esep_jax.config import load_config
    from esep_jax.training import plan

    sources = write_synthetic_sources(tmp_path / "src", num_docs=2000)  # ~500 of 2,000 documents judged
    assert main(ingest_args(sources, tmp_path / "data")) == 0
    data = str(tmp_path / "data")
    config = load_config(None, [f"loss.kind={loss}"])
    rows = plan.plan_training(config, data).task_rows
    assert rows is not None and 0 < len(rows) < 0.5 * 2000
    runs = {}
    for name, fraction in (("compact", plan.COMPACT_FRACTION), ("whole", 0.0)):
        monkeypatch.setattr(plan, "COMPACT_FRACTION", fraction)
        workdir = tmp_path / name
        assert main(["train", "--data", data, "--workdir", str(workdir), *FAST, f"--config.loss.kind={loss}",
                     "--config.optim.learning_rate=1e-2"]) == 0
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (records, final_train_state(workdir)[1].params)
    (compact_records, compact_params), (whole_records, whole_params) = runs["compact"], runs["whole"]
    assert len(compact_records) == len(whole_records)
    for a, b in zip(compact_records, whole_records):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        np.testing.assert_allclose(a.get("loss", 0.0), b.get("loss", 0.0), rtol=1e-4)
        np.testing.assert_allclose(a.get("ndcg@10", 0.0), b.get("ndcg@10", 0.0), atol=1e-6)
    for a, b in zip(jax.tree.leaves(compact_params), jax.tree.leaves(whole_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    summary = json.loads((tmp_path / "compact" / "summary.json").read_text())
    assert summary["best_dev"]["ndcg@10"] > summary["base_dev"]["ndcg@10"] + 0.01
