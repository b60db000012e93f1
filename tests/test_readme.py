"""The README is a user's guide whose commands and examples work as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_readme_starts_with_exactly_the_two_commands_and_ci_runs_the_same_tests():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["bash launch/demo.sh", "bash .ci/test.sh"]
    assert "bash .ci/test.sh" in (REPO / ".ci" / "run").read_text()


def test_every_file_and_subcommand_the_readme_names_exists():
    from esep_jax.cli import build_parser

    assert "@@" not in README, "an unfilled placeholder"
    for path in set(re.findall(r"\b((?:configs|launch|tools|docs|esep_jax|tests|\.ci)/[\w./-]+\.(?:py|sh|md|sbatch))",
                               README)):
        assert (REPO / path.split(":")[0]).exists(), path
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for name in set(re.findall(r"esep-jax ([a-z][a-z-]+)", README)):
        assert name in commands, f"esep-jax {name}"


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path):
    example = README.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test nDCG@10: base 0.5132 head" in done.stdout
