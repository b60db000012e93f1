"""`train_and_evaluate(config, data, workdir)`: plan, set up, loop, finish.

The loop only orchestrates: batches come from the step-addressed loader, the step is the jitted pure function
from `step.py`, and every `eval_every` steps every member is evaluated exactly on dev (`early_stopping.py`).
The best dev parameters live in the train state (the untrained head is the first candidate, so the selected
head is never worse on dev than the base embeddings), and every checkpoint holds them. A rerun in the same
workdir resumes from the newest valid checkpoint and ends bit-identical to an uninterrupted run, whatever
moment the previous one was killed at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from esep_jax.atomic import atomic_write_text
from esep_jax.errors import TrainingError, storage_errors
from esep_jax.heads import apply_members
from esep_jax.heads.ensemble import combine, greedy_selection
from esep_jax.heads.gate import calibrate, gate_weights, gated
from esep_jax.objectives import CORPUS, PAIRED
from esep_jax.objectives.corpus_softmax import DATA, ShardedCorpus
from esep_jax.objectives.full_corpus import logit_adjustment
from esep_jax.objectives.matryoshka import prefix_corpus
from esep_jax.runs.layout import EVENTS_DIR, METRICS_FILE, SUMMARY_FILE
from esep_jax.runs.selection import write_selection
from esep_jax.runs.state import TrainState, run_components
from esep_jax.data.loader import TrainBatches
from esep_jax.data.signals import SignalSources, build_signals
from esep_jax.evaluation.retrieval import ShardedExactIndex
from esep_jax.training import faults
from esep_jax.training.checkpointer import Checkpointer
from esep_jax.training.curves import CURVES_FILE, plot_training_curves
from esep_jax.training.early_stopping import DevSelection, record_evaluation
from esep_jax.training.initialisers import fit_initial_map, initialise_params
from esep_jax.training.metrics_log import MetricsLog
from esep_jax.training.plan import TrainingPlan, batch_slice_of_process, needs_host_corpus, plan_training
from esep_jax.training.step import make_train_step
from esep_jax.training.workdir import prepare_workdir, workdir_lock


def train_and_evaluate(config, data: str, workdir: str | Path, progress: bool = True,
                       stop_at_step: int | None = None) -> dict:
    """Trains a head on `data` in `workdir` and returns the run's summary.

    Everything is checked (`plan.py`) before the workdir is touched. `stop_at_step` ends this invocation early
    (with a checkpoint) without changing the run: for jobs cut into time slices; rerunning continues.
    """
    plan = plan_training(config, data)
    workdir = Path(workdir)
    if jax.process_index() != 0:  # one lock per workdir; process 0 speaks for a multi-host job
        return _train(plan, workdir, progress, stop_at_step)
    with workdir_lock(workdir):
        return _train(plan, workdir, progress, stop_at_step)


@dataclasses.dataclass
class _Session:
    """What a run holds while it trains."""

    plan: TrainingPlan
    workdir: Path
    train_step: Callable
    record: Callable
    member_vectors: Callable
    tables: dict[str, Any]
    dev: DevSelection
    batches: TrainBatches
    checkpointer: Checkpointer
    log: MetricsLog
    state: TrainState
    start: int
    base_dev: dict
    timings: dict = dataclasses.field(default_factory=dict)  # seconds by part of the run (summary "timings")
    corpus_bytes: int = 0  # corpus bytes this process read into memory (its shards, or all of it on the host)
    last_dev: float = float("nan")  # the newest evaluation's best member score (for the progress bar)


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    """Adds the block's wall time to `timings[name]` (where a run's time goes: the summary's `timings`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _train(plan: TrainingPlan, workdir: Path, progress: bool, stop_at_step: int | None) -> dict:
    started = time.perf_counter()
    prepare_workdir(workdir, plan.config, plan.dataset)
    timings: dict[str, float] = {}
    with _timed(timings, "set_up_s"):
        session = _set_up(plan, workdir, timings)
    try:
        step, stopped, interrupted = _loop(session, progress, stop_at_step)
    except BaseException:
        # Report the error that stopped training, not a second one from closing the files on a full disk.
        with contextlib.suppress(Exception):
            session.checkpointer.close()
        with contextlib.suppress(Exception):
            session.log.close()
        raise
    with _timed(timings, "checkpoint_s"):
        session.checkpointer.close()
    session.log.close()
    with _timed(timings, "finish_s"):
        return _finish(session, step, stopped, interrupted, started)


def _set_up(plan: TrainingPlan, workdir: Path, timings: dict) -> _Session:
    """Places the corpus and tables, builds the step, restores or creates the state (with its step-0 record)."""
    config, dataset, mesh = plan.config, plan.dataset, plan.mesh
    tc = config.train
    replicated, corpus_dtype = NamedSharding(mesh, P()), (jnp.bfloat16 if tc.corpus_dtype == "bfloat16" else jnp.float32)
    # The whole corpus on the host only where something needs it there (candidates gathered on the host,
    # closed-form fits, Matryoshka prefixes); otherwise every process reads just its own corpus shard.
    needs_host = needs_host_corpus(config, plan.signals)
    host_corpus = dataset.read_corpus() if needs_host else None
    contrasted = plan.contrasted
    dims = config.loss.matryoshka_dims
    scored_corpus = prefix_corpus(host_corpus, dims) if dims else (host_corpus if needs_host else
                                                                    dataset.corpus_table())
    tables: dict[str, Any] = {}
    if CORPUS in plan.tables:
        bias = (logit_adjustment(plan.train_qrels, dataset.num_documents, config.loss.logit_adjustment,
                                 config.loss.logit_adjustment_smoothing, config.eval.relevance_level)
                if config.loss.logit_adjustment else None)
        corpus = ShardedCorpus(scored_corpus, mesh, tc.corpus_chunk, corpus_dtype, mask=contrasted, logit_bias=bias,
                               rows=plan.task_rows)
        tables[CORPUS] = (corpus.embeddings, corpus.logit_bias)
    corpus_bytes = 0 if CORPUS not in plan.tables else corpus.host_bytes_read
    # Dev retrieves from the same device corpus (its shards), or from its own when the task scores prefixes
    # or holds only the contrasted documents.
    if CORPUS not in plan.tables or dims or plan.task_rows is not None:
        corpus = ShardedCorpus(host_corpus if host_corpus is not None else dataset.corpus_table(), mesh,
                               tc.corpus_chunk, corpus_dtype)
        corpus_bytes += corpus.host_bytes_read
    index = ShardedExactIndex(corpus.embeddings, dataset.num_documents, mesh, corpus.chunk)
    corpus_bytes += 0 if host_corpus is None else host_corpus.nbytes
    if PAIRED in plan.tables:
        tables[PAIRED] = _paired_tables(config, dataset, replicated)
    # Which rows of each global batch this process loads (the same ones as its peers on the same data shards).
    slice_index, slice_count = batch_slice_of_process(mesh)
    signals = build_signals(plan.signals, SignalSources(config, dataset, host_corpus, scored_corpus, contrasted,
                                                        slice_count))
    batches = TrainBatches(dataset, plan.train_qrels, batch_size=tc.batch_size, max_positives=config.loss.max_positives,
                           seed=tc.seed, grade_weighting=config.loss.grade_weighting,
                           relevance_level=config.eval.relevance_level, prefetch=tc.prefetch,
                           shard_index=slice_index, shard_count=slice_count, signals=signals,
                           positive_rows=None if plan.task_rows is None else _row_map(plan.task_rows,
                                                                                       dataset.num_documents))
    head, optimizer, schedule, fresh_state = run_components(config, dataset.query_dim, dataset.corpus_dim)
    train_step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, plan.terms), donate_argnums=(0,))
    state = jax.device_put(fresh_state(), replicated)
    # Jitted with the state's own shardings, so the record stays a global array on every process.
    record = jax.jit(functools.partial(record_evaluation, patience=tc.patience, min_improvement=tc.min_improvement),
                     donate_argnums=(0,),
                     out_shardings=jax.tree.map(lambda leaf: leaf.sharding, state))
    seen = np.zeros(dataset.num_documents, bool)
    seen[plan.train_qrels.doc_rows[plan.train_qrels.grades >= config.eval.relevance_level]] = True
    dev = DevSelection(config, dataset, plan.dev_qrels, index, seen=seen, host_corpus=host_corpus, dtype=corpus_dtype)
    checkpointer = Checkpointer(workdir, tc.keep_checkpoints)
    start, restored = checkpointer.resume(jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=leaf.sharding), state))
    log = MetricsLog(workdir / METRICS_FILE, resume_step=int(start or 0), enabled=jax.process_index() == 0,
                     events=workdir / EVENTS_DIR)
    session = _Session(plan=plan, workdir=workdir, train_step=train_step, record=record,
                       member_vectors=jax.jit(lambda params, queries: apply_members(head, params, queries)),
                       tables=tables, dev=dev, batches=batches, checkpointer=checkpointer, log=log,
                       corpus_bytes=corpus_bytes, timings=timings,
                       state=state if restored is None else restored, start=int(start or 0),
                       base_dev=dev.base_metrics())
    if restored is None:  # a fresh run: its starting head is the first candidate (a resumed one has it recorded)
        if config.model.init != "identity":
            session.state = _closed_form_start(session, host_corpus)
        session.state = _evaluate(session, session.state, 0)
        _save(session, 0)
    elif _evaluated_at(config, session.start) and log.count(session.start, "dev") < config.ensemble.members:
        # The dev records of the resumed step were lost (a damaged last line of metrics.jsonl): the state holds
        # that step's parameters and its record already, so the lines are rewritten and nothing is re-recorded.
        log.drop(session.start, "dev")
        _evaluate(session, session.state, session.start, record=False)
    return session


def _evaluated_at(config, step: int) -> bool:
    """Whether the loop evaluates on dev at `step` (step 0 is the starting head)."""
    return step == 0 or step % config.train.eval_every == 0 or step == config.train.num_steps


def _loop(session: _Session, progress: bool, stop_at_step: int | None) -> tuple[int, bool, bool]:
    """Trains from the session's start; returns (last step, stopped early, interrupted)."""
    tc = session.plan.config.train
    batch_sharding = NamedSharding(session.plan.mesh, P(DATA))
    # Early stopping is decided on the host at evaluations; mirroring it here keeps the hot loop sync-free.
    stopped = bool(np.all(session.state.stopped))
    step, interrupted, pending = session.start, False, []  # pending: metrics of the steps since the last log
    shown: dict[str, str] = {}
    bar = tqdm(total=tc.num_steps, initial=session.start, desc="train", unit="step", disable=not progress,
               leave=False)
    timings = session.timings
    batches = session.batches.iterate(session.start, session.start if stopped else tc.num_steps)
    with _StopRequest() as stop:
        while True:
            with _timed(timings, "host_batches_s"):  # loading and placing batches: host time
                step_index, local_batch = next(batches, (None, None))
                if step_index is None:
                    break
                batch = _place(local_batch, batch_sharding)
            with _timed(timings, "first_step_s" if step_index == session.start else "steps_s"):
                session.state, metrics = session.train_step(session.state, batch, session.tables)
                if step_index == session.start:
                    jax.block_until_ready(metrics)  # the first call compiles: measured on its own
            pending.append(metrics)  # no device op per step: summed on the host at the next log step
            step = step_index + 1
            bar.update(1)
            halt = stop.requested or step == stop_at_step or step == tc.num_steps
            eval_due = _evaluated_at(session.plan.config, step)
            save_due = eval_due or halt or step % tc.checkpoint_every == 0
            # Metrics are fetched only at log steps — and before every save, so no checkpoint holds NaNs.
            if step % tc.log_every == 0 or save_due:
                with _timed(timings, "steps_s"):  # the fetch waits for the steps dispatched since the last one
                    means = _check_and_log(session, step, pending)
                shown["loss"] = f"{means['loss']:.4f}"
                pending = []
            if eval_due:
                with _timed(timings, "dev_evaluation_s"):
                    session.state = _evaluate(session, session.state, step)
                stopped = bool(np.all(session.state.stopped))
                shown["dev"] = f"{session.last_dev:.4f}"
                shown["best"] = f"{float(np.max(session.state.best_score)):.4f}"
            bar.set_postfix(shown, refresh=False)
            if save_due or stopped:
                with _timed(timings, "checkpoint_s"):
                    _save(session, step)
            if halt or stopped:
                interrupted = not stopped and step < tc.num_steps
                break
    bar.close()
    return step, stopped, interrupted


def _place(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's batch rows as global arrays split over the data axis (one transfer for the whole batch on
    a single process)."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return {name: jax.make_array_from_process_local_data(sharding, values) for name, values in local_batch.items()}


def _check_and_log(session: _Session, step: int, pending: list[dict]) -> dict:
    """Means of the metrics since the last log step; a non-finite loss or parameter stops training."""
    count = len(pending)
    fetched = jax.device_get(pending)  # one transfer for every step's metrics
    per_member = {name: np.sum([np.asarray(m[name], np.float64) for m in fetched], axis=0) for name in fetched[0]}
    nonfinite_params = per_member.pop("nonfinite_params").sum()
    per_member = {name: (value / count).astype(np.float32) for name, value in per_member.items()}
    if not (np.isfinite(per_member["loss"]).all() and nonfinite_params == 0):
        what = "loss" if not np.isfinite(per_member["loss"]).all() else "parameters"
        raise TrainingError(f"non-finite {what} between steps {step - count + 1} and {step}; the last good "
                            f"checkpoint is kept in {session.workdir}")
    means = {name: float(value.mean()) for name, value in per_member.items()}
    if len(per_member["loss"]) > 1:
        means["member_loss"] = per_member["loss"].tolist()
    session.log.write(step, "train", means)
    return means


def _evaluate(session: _Session, state: TrainState, step: int, record: bool = True) -> TrainState:
    """Scores every member on dev (one log line each) and updates their records (unless `record` is False)."""
    vectors = np.asarray(session.member_vectors(state.params, session.dev.queries))
    scores = []
    for member, member_vectors in enumerate(vectors):
        score, metrics = session.dev.score(member_vectors)
        session.log.write(step, "dev", metrics if len(vectors) == 1 else {"member": member, **metrics})
        scores.append(score)
    session.last_dev = max(scores)
    return session.record(state, np.asarray(scores, np.float32), np.int32(step)) if record else state


def _save(session: _Session, step: int) -> None:
    session.log.sync()  # the lines of this step are durable before the checkpoint that follows them
    session.checkpointer.save(step, session.state)
    faults.after_checkpoint(step, session.checkpointer)


def _finish(session: _Session, step: int, stopped: bool, interrupted: bool, started: float) -> dict:
    """Combines the members on dev, calibrates the gate, compares the head with the identity on every dev view
    and, unless interrupted, writes the selection (`selection.json`, `gate.safetensors`) then `summary.json`."""
    plan, dev, state = session.plan, session.dev, session.state
    config = plan.config
    best_vectors = np.asarray(session.member_vectors(state.best_params, dev.queries))
    member_dev = [dev.evaluator.rank_vectors(v).metrics for v in best_vectors]
    if config.ensemble.combine == "greedy" and len(best_vectors) > 1:
        weights, _ = greedy_selection(best_vectors, lambda v: dev.score(v)[0])
    elif config.ensemble.combine == "worst_case" and len(best_vectors) > 1:
        weights, _ = greedy_selection(best_vectors, lambda v: dev.worst_case_gain(v, session.base_dev))
    else:
        weights = np.full(len(best_vectors), 1.0 / len(best_vectors))
    gate = _calibrate_gate(plan)
    head_dev = gated(gate, dev.queries, combine(best_vectors, weights.astype(np.float32)))
    best_dev = dev.views(head_dev)
    harm = dev.harm(head_dev, config.train.harm_tolerance)
    best_steps = np.asarray(state.best_step).tolist()
    summary = {
        "dev_split": plan.dev_name, "steps": step,
        "best_step": best_steps[0] if len(best_steps) == 1 else best_steps, "stopped_early": stopped,
        "interrupted": interrupted, "base_dev": session.base_dev, "best_dev": best_dev, "members": len(best_steps),
        "weights": weights.tolist(), "harmful": bool(harm and harm["harmful"]), "harm_test": harm,
        "held_out_documents": int(plan.held_out_documents.size),
        "gate": None if gate is None else {**gate.describe(), "mean_on_dev": float(
            gate_weights(gate, dev.queries).mean())},
        "member_dev": [{name: m[name] for name in ("ndcg@10", "mrr@10", "recall@100")} for m in member_dev],
        "corpus_bytes_per_process": _per_process(session.corpus_bytes),
    }
    session.timings["total_s"] = time.perf_counter() - started  # up to here: what the user waits for
    summary["timings"] = {name: round(value, 3) for name, value in session.timings.items()}
    if jax.process_index() == 0 and not interrupted:
        with storage_errors(f"the run's results in {session.workdir}"):
            write_selection(session.workdir, weights, gate)
            plot_training_curves(session.workdir / METRICS_FILE, session.workdir / CURVES_FILE,
                                 config.train.select_metric, best_steps)
            faults.before_summary()
            atomic_write_text(session.workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _per_process(value: int) -> list[int]:
    """`value` of every process of the job, in process order (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in multihost_utils.process_allgather(np.asarray([value], np.int64), tiled=True)]


def _calibrate_gate(plan: TrainingPlan):
    """The in-domain gate over the training queries (None when the config or the dims rule it out)."""
    config, dataset = plan.config, plan.dataset
    # A drift dataset's base (B's raw query on A's index) is no fallback: no gate there.
    drift = dataset.query_dim != dataset.corpus_dim or dataset.has_query_targets or dataset.num_paired > 0
    if config.model.gate == "none" or drift:
        return None
    model = config.model
    return calibrate(dataset.read_queries(plan.train_qrels.query_rows), neighbours=model.gate_neighbours,
                     width=model.gate_width, quantile=model.gate_quantile, max_anchors=model.gate_anchors,
                     seed=config.train.seed)


def _closed_form_start(session: _Session, corpus: np.ndarray) -> TrainState:
    """The state with every member's head (and best-so-far head) set to the fitted closed-form map."""
    plan, state = session.plan, session.state
    transform = fit_initial_map(plan.config, plan.dataset, plan.train_qrels, corpus, session.dev.evaluator)
    params = initialise_params(jax.device_get(state.params), transform, plan.config.model.use_bias)
    params = jax.device_put(params, jax.tree.map(lambda leaf: leaf.sharding, state.params))
    return state.replace(params=params, best_params=jax.tree.map(jnp.copy, params))


def _paired_tables(config, dataset, sharding: NamedSharding) -> tuple:
    """Every paired text's (B, A) embeddings, replicated on the devices."""
    storage = np.dtype(jnp.bfloat16 if config.train.corpus_dtype == "bfloat16" else jnp.float32)
    tables = []
    for side in ("source", "target"):
        values = dataset.table(f"paired/{side}").read().result().astype(storage)
        # From a callback, not device_put, so every process of a multi-host job places its own copy.
        tables.append(jax.make_array_from_callback(values.shape, sharding, lambda index, v=values: v[index]))
    return tuple(tables)


def _row_map(rows: np.ndarray, num_documents: int) -> np.ndarray:
    """Corpus row → its row in a table of only `rows` (−1 where absent)."""
    row_map = np.full(num_documents, -1, np.int32)
    row_map[rows] = np.arange(len(rows), dtype=np.int32)
    return row_map


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

