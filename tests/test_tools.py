"""Offline builders and studies (tools/builders, tools/studies): each starts, and the study runs end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ingest_args, write_synthetic_sources
from esep_jax.cli import main

SCRIPTS = sorted((REPO / "tools").glob("*/*.py"))


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
                       "--variant", "defaults", "--variant", "no gate;model.gate=none"]) == 0
    table = (tmp_path / "w" / "study.md").read_text()
    assert "**defaults**" in table and "**no gate**" in table
    assert "| syn → other (zero-shot) |" in table and "| new → new (new documents) |" in table
    assert Path(tmp_path / "w" / "study.json").exists()
