"""Offline builders and studies (tools/builders, tools/studies): each starts, and the study runs end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ingest_args, write_synthetic_sources
from esep_jax.cli import main

# Helper modules of a tool start with "_" (tools/builders/_teacher_finetune.py): they are imported, not run.
SCRIPTS = sorted(p for p in (REPO / "tools").glob("*/*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_tool_parses_its_arguments(script):
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_the_generalisation_study_trains_and_tabulates(synthetic_dataset, tmp_path):
    other = tmp_path / "other"
    assert main(ingest_args(write_synthetic_sources(tmp_path / "src", seed=3), other)) == 0
    new = tmp_path / "new"
    assert main(["new-documents", "--data", synthetic_dataset, "--out", str(new)]) == 0
    spec = importlib.util.spec_from_file_location("study", REPO / "tools" / "studies" / "generalisation_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main(["--workroot", str(tmp_path / "w"), "--dataset", f"syn={synthetic_dataset}",
                       "--dataset", f"other={other}", "--dataset", f"new={new}", "--train", "syn", "--train", "new",
                       "--set", "train.num_steps=20", "--set", "train.eval_every=10", "--set", "train.batch_size=32",
                       "--variant", "defaults", "--variant", "no gate;model.gate=none", "--group", "syn,new"]) == 0
    table = (tmp_path / "w" / "study.md").read_text()
    assert "**defaults**" in table and "**no gate**" in table
    assert "| syn → other (zero-shot) |" in table and "| new → new (new documents) |" in table
    assert "| syn → new" not in table  # one corpus: not zero-shot
    assert Path(tmp_path / "w" / "study.json").exists()


def test_the_gate_study_regates_a_trained_run(synthetic_dataset, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), "--config.train.num_steps=20",
                 "--config.train.eval_every=10", "--config.train.batch_size=32", "--no-progress"]) == 0
    spec = importlib.util.spec_from_file_location("gate_study", REPO / "tools" / "studies" / "gate_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    capsys.readouterr()
    out_json = tmp_path / "gate.json"
    assert study.main(["--run", str(workdir), "--target", f"syn={synthetic_dataset}:test", "--quantile", "0,0.99",
                       "--width", "0.1", "--json", str(out_json)]) == 0
    import json

    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["quantile"], r["width"]) for r in rows] == [(0.0, 0.1), (0.99, 0.1)]
    # a band at the 99th percentile switches the head off for most in-domain queries
    assert rows[1]["gate_mean"]["syn"] < rows[0]["gate_mean"]["syn"]
    assert "| 0.99 | 0.1 |" in capsys.readouterr().out
