"""Metrics as JSON lines (`metrics.jsonl`), one object per logged step or evaluation.

A resumed run first drops lines from steps after its checkpoint, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from esep_jax.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSON-lines metrics, rewound on resume."""

    def __init__(self, path: Path | str, resume_step: int = 0, enabled: bool = True):
        """`enabled=False` (every process but 0 of a multi-process job) makes writes no-ops."""
        self.path, self.enabled = Path(path), enabled
        self._handle = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._handle = self.path.open("a")

    def write(self, step: int, kind: str, values: dict) -> None:
        """Writes `{"step": step, "kind": kind, **values}`; non-finite floats become null (valid JSON)."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind}
        for name, value in values.items():
            if not isinstance(value, (bool, int, str, list)) and hasattr(value, "__float__"):
                value = float(value)  # numpy / jax scalars
            record[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # an unreadable (e.g. torn) line is dropped
