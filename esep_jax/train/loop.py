"""`train_and_evaluate(config, data, workdir)`: the training loop with dev evaluation and early stopping.

The loop only orchestrates: batches come from the step-addressed loader, the step is the jitted pure
function from `step.py`, and every `eval_every` steps the head is evaluated exactly on the dev split. The best
dev parameters so far live in the train state (the untrained identity head is the first candidate, so the
selected head is never worse on dev than the base embeddings), and every checkpoint holds it. A rerun in the
same workdir resumes from the newest checkpoint and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from esep_jax.atomic import atomic_write_text
from esep_jax.config import Config, matryoshka_dims, save_config, to_dict
from esep_jax.corpus_softmax import DATA, ShardedCorpus, make_data_corpus_mesh
from esep_jax.data.batch_signals import SampledCandidates, TeacherCandidates
from esep_jax.data.candidates import read_candidates
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.data.loader import TrainBatches
from esep_jax.ensemble import combine, greedy_selection
from esep_jax.errors import InputError
from esep_jax.eval.evaluate import SplitEvaluator
from esep_jax.eval.retrieval import ExactIndex
from esep_jax.losses import prefix_corpus, truncated_index_rows
from esep_jax.models.heads import build_head
from esep_jax.train.checkpoint import (CONFIG_FILE, RUN_INFO_FILE, Checkpointer, abstract_like,
                                      abstract_on_one_device, read_run_config)
from esep_jax.train.initialisers import fit_initial_map, initialise_params
from esep_jax.train.metrics_log import MetricsLog
from esep_jax.train.workdir_lock import workdir_lock
from esep_jax.train.step import TrainState, apply_members, create_state, make_optimizer, make_train_step

SUMMARY_FILE = "summary.json"
ENSEMBLE_FILE = "ensemble.json"  # the combination weights chosen on dev
METRICS_FILE = "metrics.jsonl"


def split_for_training(dataset: Dataset, config: Config) -> tuple[Qrels, Qrels, str]:
    """(train qrels, dev qrels, dev name). Without a dev split, a seeded fraction of train is held out."""
    train = dataset.qrels(config.train.train_split)
    if config.train.dev_split in dataset.manifest["splits"]:
        return train, dataset.qrels(config.train.dev_split), config.train.dev_split
    order = np.random.default_rng([config.train.seed, 7]).permutation(train.num_queries)
    held_out = max(1, int(round(config.train.holdout_fraction * train.num_queries)))
    if held_out >= train.num_queries:
        raise InputError(f"split {config.train.train_split!r} has too few queries to hold out a dev set",
                         field="config.train.holdout_fraction")
    return (train.subset(np.sort(order[held_out:])), train.subset(np.sort(order[:held_out])),
            f"{config.train.train_split} (held out {held_out})")


def build_training(config: Config, dataset: Dataset):
    """The head, optimiser and learning-rate schedule a config describes for a dataset."""
    dims = matryoshka_dims(config)
    if dims and dims[-1] >= dataset.corpus_dim:
        raise InputError(f"prefix sizes must be < the corpus dim {dataset.corpus_dim}",
                         field="config.loss.matryoshka_dims")
    head = build_head(config.model, dataset.corpus_dim)
    optimizer, schedule = make_optimizer(config.optim, config.train.num_steps)
    return head, optimizer, schedule


def initial_state(config: Config, dataset: Dataset, head, optimizer) -> TrainState:
    return create_state(head, optimizer, config.train.seed, dataset.query_dim, config.ensemble.members)


def load_best_head(workdir: str | Path, dataset: Dataset):
    """(config, head, members' best params [E, ...], combination weights [E], best steps [E]) of a run."""
    config = read_run_config(workdir)
    head, optimizer, _ = build_training(config, dataset)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    abstract = abstract_on_one_device(jax.eval_shape(lambda: initial_state(config, dataset, head, optimizer)))
    step, state = checkpointer.restore_newest_valid(abstract, move_damaged=False)  # eval only reads
    checkpointer.close()
    if step is None:
        raise InputError("no readable checkpoint", file=str(Path(workdir) / "checkpoints"))
    weights_file = Path(workdir) / ENSEMBLE_FILE
    weights = (np.asarray(json.loads(weights_file.read_text())["weights"], np.float32) if weights_file.exists()
               else np.full(config.ensemble.members, 1.0 / config.ensemble.members, np.float32))
    return config, head, state.best_params, weights, np.asarray(state.best_step)


def query_transform(head, member_params, weights):
    """The combined head as a jitted function of query embeddings: `Σ_m w_m f_m(q)`."""
    weights = jnp.asarray(weights)
    return jax.jit(lambda queries: combine(apply_members(head, member_params, queries), weights))


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


def _prepare_workdir(workdir: Path, config: Config, data: str) -> None:
    if jax.process_index() != 0:  # process 0 writes the run's files for the whole job
        return
    workdir.mkdir(parents=True, exist_ok=True)
    info = {"data": str(Path(data).absolute()) if "://" not in data else data}
    config_path, info_path = workdir / CONFIG_FILE, workdir / RUN_INFO_FILE
    if config_path.exists():
        previous = read_run_config(workdir)
        changed = _differences(to_dict(previous), to_dict(config))
        if changed:
            raise InputError(f"holds a run with a different config ({'; '.join(changed[:3])}); "
                             "use a new --workdir", file=str(workdir))
        if info_path.exists() and json.loads(info_path.read_text()).get("data") != info["data"]:
            raise InputError("holds a run on different data; use a new --workdir", file=str(workdir))
    save_config(config, config_path)
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def train_and_evaluate(config: Config, data: str, workdir: str | Path, progress: bool = True,
                       stop_at_step: int | None = None) -> dict:
    """Trains a head on `data` in `workdir`, holding the workdir's lock (see `_train`)."""
    workdir = Path(workdir)
    dataset = Dataset(data)  # bad data is refused before the workdir is touched
    splits = split_for_training(dataset, config)
    if jax.process_index() != 0:  # one lock per workdir; process 0 speaks for a multi-host job
        return _train(config, data, dataset, splits, workdir, progress, stop_at_step)
    with workdir_lock(workdir):
        return _train(config, data, dataset, splits, workdir, progress, stop_at_step)


def _train(config: Config, data: str, dataset: Dataset, splits, workdir: Path, progress: bool,
           stop_at_step: int | None) -> dict:
    """Trains a head on `data`, keeps the best on dev, checkpoints into `workdir`; returns the summary.

    `stop_at_step` ends this invocation early (with a checkpoint) without changing the run: for jobs cut into
    time slices. Rerunning in the same workdir continues where it stopped.
    """
    train_qrels, dev_qrels, dev_name = splits
    _prepare_workdir(workdir, config, data)
    tc = config.train

    mesh = _training_mesh(tc)
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
    corpus_dtype = jnp.bfloat16 if tc.corpus_dtype == "bfloat16" else jnp.float32
    host_corpus = dataset.read_corpus()  # read once: the train step's sharded copy and the dev index
    contrasted = _negative_mask(config, dataset, train_qrels)
    # The sampled softmax gathers its candidates on the host, so the train step holds no corpus.
    on_device = config.loss.kind != "sampled"
    # A Matryoshka loss scores every truncated index in one pass over their side-by-side rows.
    scored_corpus = prefix_corpus(host_corpus, matryoshka_dims(config)) if matryoshka_dims(config) else host_corpus
    corpus = ShardedCorpus(scored_corpus if on_device else scored_corpus[:1], mesh, tc.corpus_chunk, corpus_dtype,
                           mask=contrasted if on_device else None)
    head, optimizer, schedule = build_training(config, dataset)
    train_step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh), donate_argnums=(0,))
    member_vectors = jax.jit(lambda params, queries: apply_members(head, params, queries))
    state = jax.device_put(initial_state(config, dataset, head, optimizer), replicated)

    checkpointer = Checkpointer(workdir, tc.keep_checkpoints)
    start, restored = checkpointer.restore_newest_valid(abstract_like(state))
    state = state if restored is None else restored
    start = int(start or 0)
    log = MetricsLog(workdir / METRICS_FILE, resume_step=start, enabled=jax.process_index() == 0)
    index = ExactIndex(host_corpus, config.eval.corpus_chunk, corpus_dtype)
    signals = batch_signals(config, dataset, host_corpus, scored_corpus, contrasted)
    del scored_corpus
    paired = listwise_tables(config, dataset, replicated)
    evaluator = SplitEvaluator(dataset, dev_qrels, index, top_k=config.eval.top_k,
                               query_chunk=config.eval.query_chunk, relevance_level=config.eval.relevance_level)
    base_dev = evaluator.rank().metrics
    prefix_evaluators = _prefix_evaluators(config, dataset, dev_qrels, host_corpus, corpus_dtype)
    # Jitted with the state's own shardings, so the record stays a global array on every process.
    record = jax.jit(functools.partial(record_evaluation, patience=tc.patience), donate_argnums=(0,),
                     out_shardings=jax.tree.map(lambda leaf: leaf.sharding, state))

    def evaluate_and_record(state, step):
        """Evaluates every member on dev (one line each in the log) and updates their records."""
        vectors = np.asarray(member_vectors(state.params, evaluator.queries))
        scores = []
        for member, member_vectors_now in enumerate(vectors):
            metrics = evaluator.rank_vectors(member_vectors_now).metrics
            score = metrics[tc.select_metric]
            if prefix_evaluators:  # a Matryoshka head is selected on the mean over its prefixes and full dim
                by_prefix = {str(k): e.rank_vectors(member_vectors_now[:, :k]).metrics[tc.select_metric]
                             for k, e in prefix_evaluators}
                metrics = {**metrics, "prefix_" + tc.select_metric: by_prefix}
                score = float(np.mean([score, *by_prefix.values()]))
            log.write(step, "dev", metrics if len(vectors) == 1 else {"member": member, **metrics})
            scores.append(score)
        return record(state, np.asarray(scores, np.float32), np.int32(step)), max(scores)

    if start == 0:
        if config.model.init != "identity":
            state = _closed_form_start(state, config, dataset, train_qrels, host_corpus, evaluator)
        state, _ = evaluate_and_record(state, 0)
        checkpointer.save(0, state)

    batches = TrainBatches(dataset, train_qrels, batch_size=tc.batch_size, max_positives=config.loss.max_positives,
                           seed=tc.seed, grade_weighting=config.loss.grade_weighting,
                           relevance_level=config.eval.relevance_level, prefetch=tc.prefetch,
                           shard_index=jax.process_index(), shard_count=jax.process_count(), **signals)
    # Early stopping is decided on the host at evaluations; mirroring it here keeps the hot loop sync-free.
    stopped = bool(np.all(state.stopped))
    step, interrupted, sums, count = start, False, None, 0
    del host_corpus  # the loader's signals keep their own reference when they need it
    bar = tqdm(total=tc.num_steps, initial=start, desc="train", unit="step", disable=not progress, leave=False)
    with _StopRequest() as stop:
        for step_index, local_batch in batches.iterate(start, start if stopped else tc.num_steps):
            batch = {name: jax.make_array_from_process_local_data(batch_sharding, values)
                     for name, values in local_batch.items()}
            state, metrics = train_step(state, batch, (corpus.embeddings, corpus.mask), paired)
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            count += 1
            step = step_index + 1
            bar.update(1)
            halt = stop.requested or step == stop_at_step or step == tc.num_steps
            eval_due = step % tc.eval_every == 0 or step == tc.num_steps
            save_due = eval_due or halt or step % tc.checkpoint_every == 0
            # Metrics are fetched only at log steps — and before every save, so no checkpoint holds NaNs.
            if step % tc.log_every == 0 or save_due:
                per_member = {name: np.asarray(value) / count for name, value in sums.items()}
                means = {name: float(value.mean()) for name, value in per_member.items()}
                if len(per_member["loss"]) > 1:
                    means["member_loss"] = per_member["loss"].tolist()
                if not np.isfinite(per_member["loss"]).all():
                    checkpointer.close()
                    raise FloatingPointError(f"non-finite loss between steps {step - count + 1} and {step}; "
                                             f"the last good checkpoint is kept in {workdir}")
                log.write(step, "train", means)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                sums, count = None, 0
            if eval_due:
                state, dev = evaluate_and_record(state, step)
                stopped = bool(np.all(state.stopped))
                bar.set_postfix(dev=f"{dev:.4f}", best=f"{float(np.max(state.best_score)):.4f}")
            if save_due or stopped:
                checkpointer.save(step, state)
            if halt or stopped:
                interrupted = not stopped and step < tc.num_steps
                break
    bar.close()
    checkpointer.close()
    log.close()

    best_vectors = np.asarray(member_vectors(state.best_params, evaluator.queries))
    member_dev = [evaluator.rank_vectors(v).metrics for v in best_vectors]
    if config.ensemble.combine == "greedy" and len(best_vectors) > 1:
        weights, _ = greedy_selection(best_vectors, lambda v: evaluator.rank_vectors(v).metrics[tc.select_metric])
    else:
        weights = np.full(len(best_vectors), 1.0 / len(best_vectors))
    best_dev = evaluator.rank_vectors(combine(best_vectors, weights.astype(np.float32))).metrics
    best_steps = np.asarray(state.best_step).tolist()
    summary = {
        "dev_split": dev_name, "steps": step, "best_step": best_steps[0] if len(best_steps) == 1 else best_steps,
        "stopped_early": stopped, "interrupted": interrupted, "base_dev": base_dev, "best_dev": best_dev,
        "members": len(best_steps), "weights": weights.tolist(),
        "member_dev": [{name: m[name] for name in ("ndcg@10", "mrr@10", "recall@100")} for m in member_dev],
    }
    if jax.process_index() == 0:
        atomic_write_text(workdir / ENSEMBLE_FILE, json.dumps({"weights": weights.tolist()}) + "\n")
        atomic_write_text(workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _closed_form_start(state: TrainState, config: Config, dataset: Dataset, train_qrels: Qrels,
                       corpus: np.ndarray, dev: SplitEvaluator) -> TrainState:
    """The state with every member's head (and best-so-far head) set to the fitted closed-form map."""
    transform = fit_initial_map(config, dataset, train_qrels, corpus, dev)
    params = initialise_params(jax.device_get(state.params), transform, config.model.use_bias)
    params = jax.device_put(params, jax.tree.map(lambda leaf: leaf.sharding, state.params))
    return state.replace(params=params, best_params=jax.tree.map(jnp.copy, params))


def _prefix_evaluators(config: Config, dataset: Dataset, dev_qrels: Qrels, host_corpus: np.ndarray, dtype):
    """(k, dev evaluator over the re-normalised k-prefix index) per Matryoshka prefix size."""
    evaluators = []
    for k in matryoshka_dims(config):
        index = ExactIndex(truncated_index_rows(host_corpus, k), config.eval.corpus_chunk, dtype)
        evaluators.append((k, SplitEvaluator(dataset, dev_qrels, index, top_k=config.eval.top_k,
                                             query_chunk=config.eval.query_chunk,
                                             relevance_level=config.eval.relevance_level)))
    return evaluators


def _training_mesh(tc) -> Mesh:
    """The (data, corpus) mesh of a run, after checking the batch splits evenly over it."""
    if jax.device_count() % tc.corpus_shards:
        raise InputError(f"{jax.device_count()} devices cannot hold {tc.corpus_shards} corpus shards",
                         field="config.train.corpus_shards")
    mesh = make_data_corpus_mesh(tc.corpus_shards)
    per_step = tc.micro_batch_size or tc.batch_size
    if per_step % mesh.shape[DATA]:
        raise InputError(f"{per_step} queries per (micro-)batch do not split over {mesh.shape[DATA]} data shards",
                         field="config.train.batch_size")
    return mesh


def batch_signals(config: Config, dataset: Dataset, host_corpus: np.ndarray, scored_corpus: np.ndarray,
                  contrasted: np.ndarray) -> dict:
    """The loader's optional signals a config asks for, checked against what the dataset holds.

    Sampled candidates come from `scored_corpus` (the rows the task loss scores: with Matryoshka prefixes,
    `prefix_corpus`), teacher candidates from the plain corpus.
    """
    loss = config.loss
    signals: dict = {}
    if loss.kind == "sampled":
        hard = read_candidates(dataset, loss.hard_negatives) if loss.hard_negatives else None
        signals["sampled"] = SampledCandidates(scored_corpus, contrasted, hard_negatives=hard,
                                               random_negatives=loss.random_negatives, seed=config.train.seed)
    elif loss.hard_negatives:
        raise InputError("hard negatives join the sampled softmax: set loss.kind=sampled",
                         field="config.loss.hard_negatives")
    if loss.teacher:
        signals["teacher"] = TeacherCandidates(host_corpus, read_candidates(dataset, loss.teacher))
    if loss.distill:
        signals["query_targets"] = dataset.has_query_targets
        signals["paired"] = dataset.num_paired > 0
        if not (signals["query_targets"] or signals["paired"]):
            raise InputError("loss.distill needs target vectors: ingest with --query-targets and/or "
                             "--paired-source/--paired-target", file=dataset.location, field="config.loss.distill")
    if loss.listwise_weight > 0 and loss.listwise_queries != "train":
        signals["paired"] = True  # the batch's paired texts are the pseudo-queries
    return signals


def listwise_tables(config: Config, dataset: Dataset, sharding: NamedSharding) -> tuple | None:
    """Every paired text's (B, A) embeddings on the devices for `loss.listwise_weight` (else None)."""
    if config.loss.listwise_weight <= 0:
        return None
    if not dataset.num_paired:
        raise InputError("loss.listwise_weight needs paired texts: ingest with --paired-source/--paired-target",
                         file=dataset.location, field="config.loss.listwise_weight")
    storage = np.dtype(jnp.bfloat16 if config.train.corpus_dtype == "bfloat16" else jnp.float32)
    tables = []
    for side in ("source", "target"):
        values = dataset.table(f"paired/{side}").read().result().astype(storage)
        # From a callback, not device_put, so every process of a multi-host job places its own copy.
        tables.append(jax.make_array_from_callback(values.shape, sharding, lambda index, v=values: v[index]))
    return tuple(tables)


def _negative_mask(config: Config, dataset: Dataset, train_qrels: Qrels) -> np.ndarray:
    """Documents the full-corpus softmax contrasts against: all, or those relevant to a training query."""
    if config.loss.negatives == "all":
        return np.ones(dataset.num_documents, bool)
    mask = np.zeros(dataset.num_documents, bool)
    mask[train_qrels.doc_rows[train_qrels.grades >= config.eval.relevance_level]] = True
    return mask


def record_evaluation(state: TrainState, score: jax.Array, step: jax.Array, patience: int) -> TrainState:
    """The early-stopping update for a dev score, as a pure function (jit it with the state's shardings).

    Scores are compared in float32, the precision the record is kept in, so a tie never counts as an
    improvement; the first evaluation (best_score = -inf) always does.
    """
    improved = score > state.best_score  # [E]: members keep separate records
    stale = jnp.where(improved, 0, state.evals_since_best + 1)

    def keep_best(best, now):
        return jnp.where(improved.reshape((-1,) + (1,) * (now.ndim - 1)), now, best)

    return state.replace(
        best_params=jax.tree.map(keep_best, state.best_params, state.params),
        best_score=jnp.where(improved, score, state.best_score),
        best_step=jnp.where(improved, step, state.best_step),
        evals_since_best=stale, stopped=state.stopped | (stale >= patience))
