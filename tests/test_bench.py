"""`esep-jax bench train` on a small size: the figures it promises exist and are consistent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO
from esep_jax.cli import main


def test_bench_train_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch baseline needs torch")
    paths = {kind: tmp_path / f"bench.{ext}" for kind, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    assert main(["bench", "train", "--corpus-size", "3000", "--dim", "32", "--batch", "256", "--chunk", "512",
                 "--steps", "1", *[arg for kind, path in paths.items() for arg in (f"--{kind}", str(path))]]) == 0
    result = json.loads(paths["json"].read_text())
    for key in ("utilization", "pairs_per_s", "peak_bytes", "torch_ratio"):
        assert result[key] is not None and result[key] > 0, key
    assert result["achieved_flops"] == pytest.approx(4 * 256 * 3000 * 32 / result["step_s"])
    assert result["pairs_per_s"] == pytest.approx(256 * 3000 / result["step_s"])
    assert result["peak_bytes"] >= result["corpus_bytes"] >= 3000 * 32 * 4
    assert result["torch_status"] == "ok" and len(result["records"]) == 1
    assert "utilisation" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_over_device_counts_uses_one_process_per_count(tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "train", "--corpus-size", "2000", "--dim", "16", "--batch", "64", "--chunk", "256",
                 "--steps", "1", "--devices", "1,2", "--no-torch", "--json", str(path)]) == 0
    records = json.loads(path.read_text())["records"]
    assert [r["devices"] for r in records] == [1, 2]
    assert records[1]["mesh"] == {"data": 1, "corpus": 2}
    assert records[0]["torch_status"] == "skipped" and records[0]["torch_ratio"] is None


def test_member_cost_is_measured_in_alternation():
    from esep_jax.bench.train import interleaved_member_cost

    result = interleaved_member_cost(2000, 16, 64, 4, chunk=256, rounds=1)
    assert result["single_step_s"] > 0 and result["ensemble_step_s"] > 0
    assert result["per_member_cost"] == pytest.approx(result["ensemble_step_s"] / 4 / result["single_step_s"])


def test_the_accelerator_script_runs_at_a_small_size_on_the_cpu(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "ESEP_NO_BOOTSTRAP": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run(["bash", str(REPO / "launch" / "accelerator_bench.sh"), "--corpus-size", "5000", "--dim",
                           "32", "--batch", "256", "--steps", "1", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["dtype"] == "bfloat16" and record["epoch_s"] == pytest.approx(
        record["step_s"] * -(-502939 // 256)) and "one epoch over 502,939 queries" in done.stdout


def test_time_to_head_and_host_benchmarks_run(synthetic_dataset, tmp_path, capsys):
    from esep_jax.bench.end_to_end import host_and_device

    result = host_and_device(synthetic_dataset, 64, steps=2)
    assert result["host_s"] > 0 and result["device_s"] > 0 and result["host_fraction"] == pytest.approx(
        result["host_s"] / result["device_s"])
    assert result["pipeline_s"] > 0 and result["pipeline_overhead"] == pytest.approx(
        result["pipeline_s"] / result["device_s"] - 1)
    assert main(["bench", "time-to-head", "--data", synthetic_dataset, "--rounds", "1",
                 "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "esep-jax" in out and "pytorch" in out and "speed-up" in out
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["esep_jax"]["dev_ndcg@10"] > 0 and record["pytorch"]["dev_ndcg@10"] > 0
    assert "sooner for a head of equal or better dev: " + ("yes" if record["sooner_for_equal_dev"] else "no") in out
    curve = record["pytorch"]["curve"]
    assert curve[0][0] == 0 and max(score for *_, score in curve) == record["pytorch"]["dev_ndcg@10"]
    reached = record["pytorch_s_to_equal_dev"]
    assert reached is None or 0 < reached <= record["pytorch"]["wall_s"]


def test_the_pytorch_loop_reaches_a_dev_score_when_its_curve_first_does():
    from esep_jax.bench.end_to_end import time_to_reach

    loop = {"wall_s": 12.0, "total_s": 10.0, "curve": [(0, 1.0, 0.30), (100, 4.0, 0.33), (200, 7.0, 0.35)]}
    assert time_to_reach(loop, 0.33) == 2.0 + 4.0 and time_to_reach(loop, 0.34) == 2.0 + 7.0
    assert time_to_reach(loop, 0.36) is None


def test_bench_scale_writes_a_synthetic_corpus_block_by_block_then_steps_and_evaluates(tmp_path, capsys):
    from esep_jax.data.dataset import Dataset

    out = tmp_path / "synthetic"
    assert main(["bench", "scale", "--out", str(out), "--corpus-size", "70000", "--dim", "16", "--queries", "300",
                 "--batch", "128", "--json", str(tmp_path / "s.json")]) == 0
    dataset = Dataset(str(out))
    assert dataset.num_documents == 70000 and dataset.manifest["corpus"]["dtype"] == "bfloat16"
    assert dataset.table("corpus/embeddings").chunk_layout.read_chunk.shape[0] < 70000  # chunked, streamed
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["step_s"] > 0 and record["eval_queries"] == 30 and 0 <= record["eval_recall@100"] <= 1
    assert "exact evaluation of 30 queries" in capsys.readouterr().out
