"""A trained run, loaded for use: `TrainedRun.load(workdir)` reads and never writes.

Evaluation, export, mining, drift reports and sweeps all get a run's head from here, never from the trainer:
the config and dataset record are read from `config.json` / `run.json`, the newest checkpoint that matches
its digest is restored read-only, and the members' best parameters, combination weights and in-domain gate
(`selection.py`; uniform weights and no gate for a run that has not finished) become one query transform.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from esep_jax.config import Config
from esep_jax.errors import InputError
from esep_jax.heads import apply_members, query_transform
from esep_jax.runs import checkpoints
from esep_jax.heads.gate import Gate, gated
from esep_jax.runs.layout import SUMMARY_FILE, read_json, read_run_config, read_run_info
from esep_jax.runs.selection import read_selection
from esep_jax.runs.state import run_components


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedRun:
    """A run's best head: its config, dataset record, members' parameters and how they combine."""

    workdir: Path
    config: Config
    info: dict  # run.json: the dataset it was trained on (location, fingerprint, dims)
    head: nn.Module
    params: Any  # every member's best parameters, leading member axis [E, ...] (numpy)
    weights: np.ndarray  # [E] combination weights, summing to 1
    gate: Gate | None  # the in-domain gate (None: the head applies to every query)
    best_steps: np.ndarray  # [E] the step of each member's best dev score
    best_scores: np.ndarray  # [E]
    checkpoint_step: int  # the checkpoint these come from
    finished: bool  # whether training ended (summary.json exists)
    summary: dict | None

    @classmethod
    def load(cls, workdir: str | Path) -> "TrainedRun":
        """Reads a workdir without writing to it; one clear InputError if it holds no usable run."""
        workdir = Path(workdir)
        if not workdir.is_dir():
            raise InputError("not a directory (a training workdir is one)", file=str(workdir))
        config = read_run_config(workdir)
        info = read_run_info(workdir)
        dims = info["dataset"]
        head, _, _, fresh_state = run_components(config, dims["query_dim"], dims["corpus_dim"])
        directory = checkpoints.checkpoint_directory(workdir)
        if not directory.is_dir():
            raise InputError("no checkpoints: the run has not saved one yet", file=str(directory))
        abstract = checkpoints.abstract_on_one_device(jax.eval_shape(fresh_state))
        manager = checkpoints.reader(workdir)
        try:
            step, state, _ = checkpoints.newest_valid(manager, abstract)
        finally:
            manager.close()
        if step is None:
            raise InputError("no checkpoint yet: the run has not saved one", file=str(directory))
        weights, gate = read_selection(workdir, config.ensemble.members)
        summary = read_json(workdir / SUMMARY_FILE, "the run summary") if (workdir / SUMMARY_FILE).exists() else None
        return cls(workdir=workdir, config=config, info=info, head=head,
                   params=jax.tree.map(np.asarray, state.best_params), weights=weights, gate=gate,
                   best_steps=np.asarray(state.best_step), best_scores=np.asarray(state.best_score),
                   checkpoint_step=int(step), finished=summary is not None, summary=summary)

    @property
    def query_dim(self) -> int:
        return int(self.info["dataset"]["query_dim"])

    @property
    def corpus_dim(self) -> int:
        return int(self.info["dataset"]["corpus_dim"])

    @property
    def members(self) -> int:
        return int(self.weights.shape[0])

    @functools.cached_property
    def head_transform(self):
        """The combined head, ungated, as one jitted function of query embeddings `[Q, d_in] -> [Q, d_out]`."""
        return query_transform(self.head, self.params, self.weights)

    def transform(self, queries) -> np.ndarray:
        """What the run serves for query embeddings: the combined head, blended with the base by the gate."""
        queries = np.asarray(queries, np.float32)
        return gated(self.gate, queries, np.asarray(self.head_transform(queries)))

    def member_vectors(self, queries: np.ndarray) -> np.ndarray:
        """Every member's vectors for `queries`, `[E, Q, d_out]`."""
        return np.asarray(apply_members(self.head, self.params, queries))

    def check_fits(self, dataset) -> None:
        """Refuses a dataset whose dims differ from the run's (evaluating a head on other data: zero-shot)."""
        if (dataset.query_dim, dataset.corpus_dim) != (self.query_dim, self.corpus_dim):
            raise InputError(f"query/corpus dims {dataset.query_dim}/{dataset.corpus_dim} differ from the run's "
                             f"{self.query_dim}/{self.corpus_dim} (trained on {self.info.get('data')})",
                             file=dataset.location)
