"""A run's metrics: JSON lines (`metrics.jsonl`, one object per logged step or evaluation) and the same scalars
as TensorBoard event files (`events/`, tensorboardX).

A resumed run first drops the lines of steps after its checkpoint, so the log reads as one uninterrupted run;
its event writer starts with a purge at that step, so TensorBoard drops the old run's later points as well.
A line that does not parse (torn by a crash mid-write, or damaged later) is dropped with a warning naming it;
lines are flushed and synced before every checkpoint, so a line from before a committed checkpoint survives
a crash.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from esep_jax.atomic import atomic_write_text
from esep_jax.errors import storage_errors


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever it is
    installed, only to accept torch tensors (esep-jax logs floats): 1.0 s of a 10 s demo run here. Unless
    torch is already loaded, its import is refused for that one import and allowed again after it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """Append-only JSON-lines metrics, rewound on resume."""

    def __init__(self, path: Path | str, resume_step: int = 0, enabled: bool = True, events: Path | None = None):
        """`enabled=False` (every process but 0 of a multi-process job) makes writes no-ops; `events` is the
        TensorBoard directory (None: no event files)."""
        self.path, self.enabled = Path(path), enabled
        self._handle = None
        self._events = None
        self.kept: list[dict] = []  # the records kept from an earlier invocation (steps <= resume_step)
        if not enabled:
            return
        with storage_errors(str(self.path)):
            if self.path.exists():
                kept = []
                for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    step = _step_of(line)
                    if step is None:
                        if line.strip():
                            sys.stderr.write(f"esep-jax: warning: {self.path}: line {number} is damaged and was "
                                             "dropped\n")
                        continue
                    if step <= resume_step:
                        kept.append(line)
                        self.kept.append(json.loads(line))
                atomic_write_text(self.path, "".join(line + "\n" for line in kept))
            self._handle = self.path.open("a", encoding="utf-8")
            if events is not None:
                self._events = _summary_writer_class()(
                    str(events), purge_step=resume_step + 1 if resume_step else None, flush_secs=30)

    def count(self, step: int, kind: str) -> int:
        """How many kept records of `kind` the log holds for `step`."""
        return sum(1 for record in self.kept if record["step"] == step and record.get("kind") == kind)

    def drop(self, step: int, kind: str) -> None:
        """Removes the kept records of `kind` at `step` (before they are written again)."""
        if not self.enabled:
            return
        self.kept = [r for r in self.kept if not (r["step"] == step and r.get("kind") == kind)]
        with storage_errors(str(self.path)):
            self._handle.close()
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in self.kept))
            self._handle = self.path.open("a", encoding="utf-8")

    def write(self, step: int, kind: str, values: dict) -> None:
        """Writes `{"step": step, "kind": kind, **values}`; non-finite floats become null (valid JSON)."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind}
        for name, value in values.items():
            if not isinstance(value, (bool, int, str, list, dict)) and hasattr(value, "__float__"):
                value = float(value)  # numpy / jax scalars
            record[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        with storage_errors(str(self.path)):
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        if self._events is not None:
            self._scalars(f"{kind}/" + (f"member{values['member']}/" if "member" in values else ""), record, step)

    def _scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            if name in ("step", "kind", "member"):
                continue
            if isinstance(value, dict):
                self._scalars(f"{prefix}{name}/", value, step)
            elif isinstance(value, list):
                for member, item in enumerate(value):
                    if isinstance(item, (int, float)):
                        self._events.add_scalar(f"{prefix}{name}/member{member}", item, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self._events.add_scalar(f"{prefix}{name}", value, step)

    def sync(self) -> None:
        """Makes every line written so far durable (called before a checkpoint is saved)."""
        if self._handle is not None:
            with storage_errors(str(self.path)):
                os.fsync(self._handle.fileno())
                if self._events is not None:
                    self._events.flush()

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with storage_errors(str(self.path)):
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                if self._events is not None:
                    self._events.close()
                    self._events = None


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
        return int(record["step"]) if isinstance(record, dict) else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
