"""Fault injection for the crash tests: `ESEP_FAULT` makes the trainer kill itself (SIGKILL, like `kill -9`)
at a chosen moment, so a test can crash a run exactly there instead of hoping a random kill lands in it.

    ESEP_FAULT=checkpoint:N   right after the checkpoint of step N has committed
    ESEP_FAULT=summary        after selection.json, before summary.json is written

Unset (always, outside tests) these are no-ops.
"""

from __future__ import annotations

import os
import signal

_VARIABLE = "ESEP_FAULT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_checkpoint(step: int, checkpointer) -> None:
    if os.environ.get(_VARIABLE) == f"checkpoint:{step}":
        checkpointer.manager.wait_until_finished()  # the save is committed: the crash lands just after it
        _die()


def before_summary() -> None:
    if os.environ.get(_VARIABLE) == "summary":
        _die()
