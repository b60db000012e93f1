"""The files of a training workdir, and reading the ones that describe the run.

    config.json       the resolved config (esep_jax.config), written before training starts
    run.json          the dataset it trains on: location, content fingerprint, dims (a rerun on other data is refused)
    metrics.jsonl     one JSON object per log step and per dev evaluation
    events/           the same metrics as TensorBoard event files (`tensorboard --logdir WORKDIR/events`)
    train_curves.png  loss and dev metric against step, per member (written when training ends)
    checkpoints/      orbax checkpoints of the whole train state, each with a digest of its contents
    selection.json    the members' combination weights and the in-domain gate (written when training ends)
    gate.safetensors  the gate's anchors (selection.py)
    summary.json      the run's outcome (written last: its presence means the run finished)
    .lock             held by the one trainer working in the workdir
"""

from __future__ import annotations

import json
from pathlib import Path

from esep_jax.config import Config, read_config
from esep_jax.errors import InputError

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "events"
CHECKPOINT_DIR = "checkpoints"
CORRUPTED_DIR = "corrupted_checkpoints"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
RUN_FORMAT = 2  # 2: checkpoints carry a content digest; run.json a dataset fingerprint


def read_run_config(workdir: Path | str) -> Config:
    """The resolved config a run saved beside its checkpoints."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputError("no config.json: not an esep-jax training workdir", file=str(workdir))
    return read_config(path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object file of the workdir, or one clear error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {what}: {error}", file=str(path)) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", file=str(path))
    return data


def read_run_info(workdir: Path | str) -> dict:
    """`run.json`: the dataset the run trains on (`data`, `dataset` {fingerprint, name, dims})."""
    path = Path(workdir) / RUN_INFO_FILE
    info = read_json(path, "the run's dataset record")
    if info.get("format") != RUN_FORMAT or not isinstance(info.get("dataset"), dict):
        raise InputError(f"written by another esep-jax version (run format {info.get('format')!r}, this one "
                         f"reads {RUN_FORMAT}); train again in a new --workdir", file=str(path), field="format")
    for field, kind in (("query_dim", int), ("corpus_dim", int)):
        if not isinstance(info["dataset"].get(field), kind):
            raise InputError(f"missing or not an {kind.__name__}", file=str(path), field=f"dataset.{field}")
    return info
