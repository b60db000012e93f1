"""Orbax checkpoints of the whole train state, and loading a run's best head for evaluation.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames on commit), so a kill
mid-save leaves the previous checkpoint as the newest valid one. Restores go into an abstract state built
from the run's saved config, so parameters come back with the right shapes, dtypes and shardings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from esep_jax.atomic import atomic_write_text
from esep_jax.config import Config, read_config
from esep_jax.errors import InputError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount); earlier ones are intact."""


class CheckpointRestoreError(RuntimeError):
    """An intact checkpoint does not fit the state it is restored into (another config or structure)."""


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `workdir/checkpoints`."""

    def __init__(self, workdir: Path | str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a crash or a full disk interrupted
        )
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an asynchronous save of `state` at `step` (a no-op if that step is already saved)."""
        if step in self.manager.all_steps():
            return
        self._seal_finished()
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as error:
            raise self._write_error(error) from None

    def _write_error(self, error: Exception) -> CheckpointWriteError:
        reason = " ".join(str(error).split())
        if "os_error_code" in reason:  # tensorstore's messages end with the OS's own words
            reason = reason[reason.rfind(": ", 0, reason.rfind("[os_error_code")) + 2:]
        return CheckpointWriteError(f"could not write a checkpoint under {self.directory}: {reason[:300]} "
                                    f"(earlier checkpoints are intact; free space and rerun to resume)")

    def _seal_finished(self) -> None:
        """Records sha256 checksums of every committed checkpoint that has none yet.

        Orbax writes raw array bytes without checksums, so a flipped bit would restore silently; the sums
        let `restore_newest_valid` tell a damaged checkpoint from a good one. Waiting here costs nothing
        new: orbax waits for the previous save before it starts the next one anyway.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(error) from None
        if jax.process_index() != 0:
            return
        steps = set(self.manager.all_steps())
        for stale in self.directory.glob(".*.sha256.json"):  # sums of checkpoints the policy has deleted
            if int(stale.name.split(".")[1]) not in steps:
                stale.unlink(missing_ok=True)
        for step in steps:
            record = self._checksum_file(step)
            if not record.exists():
                atomic_write_text(record, json.dumps(_checksums(self.directory / str(step)), indent=0))

    def _checksum_file(self, step: int) -> Path:
        return self.directory / f".{step}.sha256.json"

    def _damage(self, step: int) -> str | None:
        """Why checkpoint `step` is damaged, or None if its files match their recorded sums (or none exist)."""
        record = self._checksum_file(step)
        if not record.exists():
            return None  # committed by orbax but not yet sealed (the trainer was killed): trust the commit
        expected, actual = json.loads(record.read_text()), _checksums(self.directory / str(step))
        changed = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
        return f"sha256 mismatch in {', '.join(changed[:3])}" if changed else None

    def restore(self, step: int, abstract_state):
        """Restores the state saved at `step` into the structure and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_newest_valid(self, abstract_state, move_damaged: bool = True):
        """(step, state) of the newest checkpoint whose files match their checksums, or (None, None).

        A checkpoint whose files no longer match the sha256 sums recorded after it was written (a bad disk, a
        truncated copy) is skipped with a warning — and, for a trainer, moved aside to `corrupted_checkpoints/`
        — and the one before it is used: a resumed run recomputes the lost steps exactly, since batches and
        keys are functions of the step. A checkpoint that is intact but does not restore (another config or
        structure) is an error, never a reason to move anything.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._damage(step)
            if problem is None:
                break
            damaged.append((step, problem))
        else:
            step = None
        if damaged and move_damaged and jax.process_index() == 0:  # all processes saw the same files
            for bad_step, _ in damaged:
                aside = self.directory.parent / "corrupted_checkpoints" / f"{bad_step}-{int(time.time())}"
                aside.parent.mkdir(exist_ok=True)
                shutil.move(str(self.directory / str(bad_step)), aside)
                self._checksum_file(bad_step).unlink(missing_ok=True)
        for bad_step, problem in damaged:
            sys.stderr.write(f"esep-jax: warning: checkpoint at step {bad_step} is damaged ({problem}); "
                             f"{'moved to corrupted_checkpoints/, ' if move_damaged else ''}"
                             "falling back to an earlier one\n")
        if damaged and move_damaged:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("esep_jax: damaged checkpoints moved aside")
            self.manager.reload()
        if step is None:
            return None, None
        try:
            return step, self.restore(step, abstract_state)
        except Exception as error:
            reason = " ".join(str(error).split())[:300]
            raise CheckpointRestoreError(f"checkpoint at step {step} in {self.directory} is intact but does not "
                                         f"restore into this run's state: {reason}") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self._seal_finished()
        self.manager.close()


def _checksums(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def abstract_on_one_device(abstract_state):
    """An abstract state (e.g. from `jax.eval_shape`) placed on this process's first device, to restore a
    checkpoint whatever topology wrote it."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_state)


def abstract_like(state):
    """Shape/dtype/sharding structs of a concrete state, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def read_run_config(workdir: Path | str) -> Config:
    """The resolved config a run saved beside its checkpoints."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputError("no config.json: not an esep-jax training workdir", file=str(workdir))
    return read_config(path)
