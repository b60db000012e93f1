"""The trainer's claim on a workdir: one trainer at a time, and one run per workdir.

`workdir_lock` is an exclusive `flock` held for the whole run; it vanishes with the process that holds it, so a
crashed or killed trainer never leaves a stale lock, and a second trainer on the same workdir is refused at once
instead of interleaving checkpoints. `prepare_workdir` writes `config.json` and `run.json` — after everything
about the run has been checked (`plan.py`) — and refuses a workdir that holds a run with another config or
another dataset (compared by content fingerprint, so the same path re-ingested with other data is caught).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import jax

from esep_jax.atomic import atomic_write_text
from esep_jax.config import Config, differences, save_config
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError, storage_errors
from esep_jax.runs.layout import CONFIG_FILE, LOCK_FILE, RUN_FORMAT, RUN_INFO_FILE, read_run_config, read_run_info


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Holds the workdir's lock for the block; refuses with an InputError if another process holds it."""
    with storage_errors(f"the workdir {workdir}"):
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise InputError(f"in use by another trainer (pid {owner}); wait for it or use another --workdir",
                             file=str(workdir)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def run_info(dataset: Dataset) -> dict:
    """`run.json`'s content for a run on `dataset`."""
    return {"format": RUN_FORMAT, "data": dataset.location,
            "dataset": {"fingerprint": dataset.fingerprint, "name": dataset.manifest.get("name"),
                        "query_dim": dataset.query_dim, "corpus_dim": dataset.corpus_dim,
                        "documents": dataset.num_documents}}


def prepare_workdir(workdir: Path, config: Config, dataset: Dataset) -> None:
    """Writes the run's config and dataset record, or refuses a workdir holding a different run."""
    if jax.process_index() != 0:  # process 0 writes the run's files for the whole job
        return
    config_path, info_path = workdir / CONFIG_FILE, workdir / RUN_INFO_FILE
    info = run_info(dataset)
    if config_path.exists():
        changed = differences(read_run_config(workdir), config)
        if changed:
            raise InputError(f"holds a run with a different config ({'; '.join(changed[:3])}); "
                             "use a new --workdir", file=str(workdir))
    if info_path.exists():
        previous = read_run_info(workdir)["dataset"].get("fingerprint")
        if previous != info["dataset"]["fingerprint"]:
            raise InputError(f"holds a run on different data (dataset fingerprint {str(previous)[:12]} != "
                             f"{info['dataset']['fingerprint'][:12]} of {dataset.location}); use a new --workdir",
                             file=str(workdir))
    with storage_errors(f"the run's files in {workdir}"):
        save_config(config, config_path)
        atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
