"""The trainer's side of checkpoints: saving (asynchronously, atomically, digest included) and resuming.

The format and the verified read are `esep_jax.runs.checkpoints`; this adds what only a trainer does: writing,
keeping the newest `keep`, moving damaged checkpoints aside to `corrupted_checkpoints/`, and turning a
storage failure into one clear error while earlier checkpoints stay intact.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from esep_jax.errors import StorageError, os_reason
from esep_jax.runs import checkpoints
from esep_jax.runs.layout import CORRUPTED_DIR


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `workdir/checkpoints`."""

    def __init__(self, workdir: Path | str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a crash or a full disk interrupted
        )
        self.directory = checkpoints.checkpoint_directory(workdir)
        with _orbax_errors_as_one_line(self.directory):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state) -> None:
        """Starts an asynchronous save of `state` and its digest at `step` (a no-op if already saved)."""
        if step in self.manager.all_steps():
            return
        with _orbax_errors_as_one_line(self.directory):
            self.manager.wait_until_finished()  # a failed previous save surfaces here, before the next starts
            self.manager.save(step, args=checkpoints.save_args(state), force=True)

    def resume(self, abstract_state):
        """(step, state) of the newest checkpoint that matches its digest, or (None, None).

        Damaged checkpoints (a truncated or bit-flipped file) are reported, moved aside to
        `corrupted_checkpoints/` and skipped: a resumed run recomputes the lost steps exactly, since batches
        and keys are functions of the step. If every checkpoint is damaged the run stops with an error.
        """
        step, state, damaged = checkpoints.newest_valid(self.manager, abstract_state)
        if not damaged:
            return step, state
        if jax.process_index() == 0:  # every process saw the same files; one moves them
            for bad_step, _ in damaged:
                aside = self.directory.parent / CORRUPTED_DIR / f"{bad_step}-{int(time.time())}"
                aside.parent.mkdir(exist_ok=True)
                shutil.move(str(self.directory / str(bad_step)), aside)
            for bad_step, problem in damaged:
                sys.stderr.write(f"esep-jax: warning: checkpoint at step {bad_step} is damaged ({problem}); "
                                 f"moved to {CORRUPTED_DIR}/, resuming from step {step}\n")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("esep_jax: damaged checkpoints moved aside")
        self.manager.reload()
        return step, state

    def close(self) -> None:
        """Waits for the last save to commit."""
        with _orbax_errors_as_one_line(self.directory):
            self.manager.wait_until_finished()
            self.manager.close()


class _orbax_errors_as_one_line:
    """A failed write (a full disk, a quota, a lost mount) becomes one StorageError; orbax's own multi-line
    logging of the failure (from its background threads) is silenced meanwhile."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, kind, error, traceback):
        self.logger.setLevel(self.level)
        if not isinstance(error, (OSError, ValueError, RuntimeError)) or isinstance(error, StorageError):
            return False
        raise StorageError(f"could not write a checkpoint under {self.directory}: {os_reason(error)} "
                           "(earlier checkpoints are intact; free space and rerun to resume)") from None
