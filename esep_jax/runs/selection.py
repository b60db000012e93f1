"""What training selected, beside the checkpoints: the members' combination weights and the in-domain gate.

    selection.json      {"weights": [E floats], "gate": {kind, neighbours, lower, upper, anchors} | null}
    gate.safetensors    the gate's anchors `[T, d_in]` (float32; safetensors holds raw arrays, never pickle)

Both are written when training ends, before summary.json, each atomically; a run that has not finished has
neither, and is read with uniform weights and no gate.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.errors import InputError
from esep_jax.heads.gate import Gate
from esep_jax.runs.layout import read_json

SELECTION_FILE = "selection.json"
GATE_FILE = "gate.safetensors"


def write_selection(workdir: Path, weights: np.ndarray, gate: Gate | None) -> None:
    """Writes the gate's anchors (if any), then `selection.json` naming them."""
    from safetensors.numpy import save_file

    if gate is not None:
        fd, tmp = tempfile.mkstemp(prefix=f".{GATE_FILE}.tmp-", dir=workdir)
        os.close(fd)
        try:
            save_file({"anchors": np.ascontiguousarray(gate.anchors, np.float32)}, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, workdir / GATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    record = {"weights": np.asarray(weights).tolist(), "gate": None if gate is None else gate.describe()}
    atomic_write_text(workdir / SELECTION_FILE, json.dumps(record, indent=1) + "\n")


def read_selection(workdir: Path, members: int) -> tuple[np.ndarray, Gate | None]:
    """(weights [E], gate) of a finished run; (uniform weights, None) for one that has not finished."""
    path = workdir / SELECTION_FILE
    if not path.exists():
        return np.full(members, 1.0 / members, np.float32), None
    record = read_json(path, "the run's selection")
    weights = np.asarray(record.get("weights"), np.float32)
    if weights.shape != (members,):
        raise InputError(f"expected {members} weights", file=str(path), field="weights")
    description = record.get("gate")
    if description is None:
        return weights, None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        anchors = load_file(str(workdir / GATE_FILE))["anchors"]
        gate = Gate.from_description(description, anchors)
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"cannot read the gate: {error}", file=str(workdir / GATE_FILE)) from None
    if gate.anchors.shape[0] != description.get("anchors"):
        raise InputError(f"{gate.anchors.shape[0]} anchors, selection.json says {description.get('anchors')}",
                         file=str(workdir / GATE_FILE))
    return weights, gate
