"""Joining a multi-process job through JAX's own distributed runtime.

Every process of a job runs the same `esep-jax train` command. The coordinator comes from flags or the
environment (`ESEP_COORDINATOR`, `ESEP_NUM_PROCESSES`, `ESEP_PROCESS_ID`); with `--distributed auto`, JAX
detects Slurm, TPU pod slices, Open MPI and Kubernetes itself. Heartbeats make a job whose peer died fail
within `heartbeat_timeout_s` instead of hanging in a collective.
"""

from __future__ import annotations

import os

import jax

from esep_jax.errors import InputError


def initialize(mode: str | None = None, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 30) -> bool:
    """Calls `jax.distributed.initialize` when asked to; returns whether this is a multi-process job.

    `mode`: None/"off" (single process unless a coordinator is configured), "auto" (cluster auto-detection),
    or "explicit" (coordinator, process count and id from the arguments or the ESEP_* environment).
    """
    coordinator = coordinator or os.environ.get("ESEP_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _int_env("ESEP_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("ESEP_PROCESS_ID")
    if mode in (None, "off") and coordinator is None:
        return False
    if mode == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
        return jax.process_count() > 1
    if coordinator is None or num_processes is None or process_id is None:
        raise InputError("a multi-process job needs --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I (or ESEP_COORDINATOR, ESEP_NUM_PROCESSES, ESEP_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise InputError(f"process id {process_id} is not in [0, {num_processes})", field="--process-id")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=max(heartbeat_timeout_s, 60))
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not an integer") from None
