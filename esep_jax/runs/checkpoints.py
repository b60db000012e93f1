"""The checkpoint format, and reading checkpoints without writing anything.

A checkpoint is an orbax composite of two items committed together, atomically (orbax writes into a
temporary directory and renames it on commit):

    checkpoints/<step>/state     the whole train state (`state.TrainState`)
    checkpoints/<step>/digest    {"sha256": ..., "leaves": n}: a hash of every leaf's dtype, shape and bytes

Orbax stores raw array bytes without checksums, so a flipped bit would restore silently; the digest is
computed from the state before it is written and committed in the same rename, so there is no moment at
which a committed checkpoint lacks it. Reading a checkpoint recomputes it: a checkpoint that fails to restore
(a truncated file) or whose contents differ from its digest is damaged, and the one before it is used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from esep_jax.errors import InputError
from esep_jax.runs.layout import CHECKPOINT_DIR

STATE_ITEM, DIGEST_ITEM = "state", "digest"


class DamagedCheckpoint(Exception):
    """A committed checkpoint whose contents do not restore, or do not match their digest."""


def host_value(leaf) -> np.ndarray:
    """A state leaf as numpy on this process (replicated leaves of a multi-host job: the local replica)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        shard = leaf.addressable_shards[0]
        if shard.data.shape != leaf.shape:
            raise ValueError(f"leaf of shape {leaf.shape} is not replicated on this process")
        return np.asarray(shard.data)
    return np.asarray(leaf)


def state_digest(state) -> dict:
    """`{"sha256", "leaves"}` over every leaf's path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for path, leaf in leaves:
        value = np.ascontiguousarray(host_value(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return {"sha256": digest.hexdigest(), "leaves": len(leaves)}


def save_args(state) -> ocp.args.Composite:
    """What the trainer hands to `CheckpointManager.save`: the state and its digest, one commit."""
    return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                 DIGEST_ITEM: ocp.args.JsonSave(state_digest(state))})


def checkpoint_directory(workdir: Path | str) -> Path:
    return Path(workdir).absolute() / CHECKPOINT_DIR


def reader(workdir: Path | str) -> ocp.CheckpointManager:
    """A manager that only reads (`read_only`: it creates, cleans and deletes nothing)."""
    directory = checkpoint_directory(workdir)
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False)
    with _quiet_orbax():  # it warns that a read-only manager is read-only
        return ocp.CheckpointManager(directory, options=options)


def restore_verified(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The state saved at `step`, restored into `abstract_state`'s structure and shardings, after checking it
    against its digest. Raises DamagedCheckpoint with the reason."""
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                 DIGEST_ITEM: ocp.args.JsonRestore()})
    try:
        with _quiet_orbax():
            restored = manager.restore(step, args=args)
    except Exception as error:  # orbax and tensorstore raise many types for a truncated or missing file
        raise DamagedCheckpoint(f"a file does not read back: {_one_line(error)[:120]}") from None
    recorded = restored[DIGEST_ITEM]
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        raise DamagedCheckpoint("its digest is missing or unreadable")
    actual = state_digest(restored[STATE_ITEM])
    if actual != {"sha256": recorded.get("sha256"), "leaves": recorded.get("leaves")}:
        raise DamagedCheckpoint("its contents differ from the digest saved with them")
    return restored[STATE_ITEM]


def newest_valid(manager: ocp.CheckpointManager, abstract_state):
    """(step, state, [(damaged step, reason), ...]) of the newest checkpoint that restores and matches its
    digest, trying newer ones first; (None, None, []) when there are none. Every checkpoint damaged is an
    InputError (a run is never silently restarted from scratch)."""
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore_verified(manager, step, abstract_state), damaged
        except DamagedCheckpoint as problem:
            damaged.append((step, str(problem)))
    if damaged:
        reasons = "; ".join(f"step {step}: {reason}" for step, reason in damaged[:3])
        raise InputError(f"every checkpoint is damaged ({reasons}); move the directory aside to start this run "
                         "again, or use a new --workdir", file=str(manager.directory))
    return None, None, []


def abstract_on_one_device(abstract_state):
    """An abstract state (e.g. from `jax.eval_shape`) placed on this process's first device, to restore a
    checkpoint whatever topology wrote it."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_state)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


class _quiet_orbax:
    """Orbax logs every failed read as a multi-line error before raising it; the caller reports it in one line."""

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
