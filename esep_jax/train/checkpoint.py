"""Orbax checkpoints of the whole train state, and loading a run's best head for evaluation.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames on commit), so a kill
mid-save leaves the previous checkpoint as the newest valid one. Restores go into an abstract state built
from the run's saved config, so parameters come back with the right shapes, dtypes and shardings.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from esep_jax.config import Config, read_config
from esep_jax.errors import InputError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run.json"


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `workdir/checkpoints`."""

    def __init__(self, workdir: Path | str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an asynchronous save of `state` at `step` (a no-op if that step is already saved)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, abstract_state):
        """Restores the state saved at `step` into the structure and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """Shape/dtype/sharding structs of a concrete state, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def read_run_config(workdir: Path | str) -> Config:
    """The resolved config a run saved beside its checkpoints."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputError("no config.json: not an esep-jax training workdir", file=str(workdir))
    return read_config(path)
