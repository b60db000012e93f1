"""Everything about a training run that can be checked before its workdir is touched.

`plan_training(config, data)` opens the dataset, chooses the train and dev queries, builds the loss terms
(which refuse what the dataset cannot supply), checks that named candidate lists exist, that the batch splits
over the devices, and that the run fits in memory. A config error found here leaves the workdir as it was, so
the corrected command is never refused as "a different config".
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from esep_jax.config import Config
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.errors import InputError
from esep_jax.evaluation.views import hold_out_documents
from esep_jax.heads import build_head
from esep_jax.objectives import CORPUS, Term, build_terms, needed_signals, needed_tables
from esep_jax.objectives.corpus_softmax import DATA, make_data_corpus_mesh
from esep_jax.training import memory

PAIRED_INITIALISERS = ("paired_ridge", "paired_procrustes", "mean_shift")


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingPlan:
    """A checked run: its data, splits, loss terms and device mesh."""

    config: Config
    dataset: Dataset
    train_qrels: Qrels  # without the held-out documents' judgements
    dev_qrels: Qrels
    dev_name: str
    held_out_documents: np.ndarray  # corpus rows whose training judgements were dropped (the new-documents view)
    terms: list[Term]
    mesh: Mesh
    memory: dict  # estimated bytes by part
    contrasted: np.ndarray  # [N] bool: the documents the task softmax contrasts against
    # Sorted rows of the documents placed as the task's corpus table, or None for every row (see `task_rows`).
    task_rows: np.ndarray | None = None

    @property
    def signals(self) -> frozenset[str]:
        return needed_signals(self.terms)

    @property
    def tables(self) -> frozenset[str]:
        return needed_tables(self.terms)


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


def training_mesh(config: Config) -> Mesh:
    """The (data, corpus) mesh of a run, after checking the batch splits evenly over it."""
    tc = config.train
    if jax.device_count() % tc.corpus_shards:
        raise InputError(f"{jax.device_count()} devices cannot hold {tc.corpus_shards} corpus shards",
                         field="config.train.corpus_shards")
    mesh = make_data_corpus_mesh(tc.corpus_shards)
    per_step = tc.micro_batch_size or tc.batch_size
    if per_step % mesh.shape[DATA]:
        raise InputError(f"{per_step} queries per (micro-)batch do not split over {mesh.shape[DATA]} data shards",
                         field="config.train.batch_size")
    _, slices = batch_slice_of_process(mesh)
    if tc.batch_size % slices:
        raise InputError(f"batch size {tc.batch_size} does not split over {slices} processes' data shards",
                         field="config.train.batch_size")
    return mesh


def batch_slice_of_process(mesh: Mesh) -> tuple[int, int]:
    """(slice index, slice count): which equal slice of every global batch this process loads.

    Batch rows are split over the mesh's `data` axis; a process loads the rows of the data shards its devices
    hold. When the corpus axis spans processes, several processes hold the same data shards and load the same
    rows (slice count < process count); every process's devices must cover an equal, contiguous run of data
    shards.
    """
    data_axis = mesh.axis_names.index(DATA)
    coordinates = np.argwhere(np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices))
    mine = np.unique(coordinates[:, data_axis])
    per_process = mine.size
    if mine.size == 0 or np.any(np.diff(mine) != 1) or mine[0] % per_process or mesh.shape[DATA] % per_process:
        raise InputError(f"this process's devices hold data shards {mine.tolist()} of {mesh.shape[DATA]}: "
                         "not an equal contiguous run", field="config.train.corpus_shards")
    return int(mine[0] // per_process), int(mesh.shape[DATA] // per_process)


def _check_dataset_fields(config: Config, dataset: Dataset) -> None:
    """Names in the config that must exist in the dataset, and dims it must have."""
    candidates = dataset.manifest.get("candidates", {})
    for field in ("hard_negatives", "teacher"):
        name = getattr(config.loss, field)
        if name and name not in candidates:
            raise InputError(f"no candidates named {name!r} in the dataset (available: "
                             f"{', '.join(sorted(candidates)) or 'none'}; see `esep-jax mine` / `esep-jax teacher`)",
                             file=dataset.location, field=f"config.loss.{field}")
    dims = config.loss.matryoshka_dims
    if dims and max(dims) >= dataset.corpus_dim:
        raise InputError(f"prefix sizes must be < the corpus dim {dataset.corpus_dim}",
                         field="config.loss.matryoshka_dims")
    init = config.model.init
    if init in PAIRED_INITIALISERS and not (dataset.has_query_targets or dataset.num_paired):
        raise InputError("paired initialisers need target vectors: ingest with --query-targets and/or "
                         "--paired-source/--paired-target", file=dataset.location, field="config.model.init")
    if init == "mean_shift" and dataset.query_dim != dataset.corpus_dim:
        raise InputError("mean_shift needs equal query and corpus dims", field="config.model.init")


def needs_host_corpus(config: Config, signals: frozenset[str]) -> bool:
    """Whether a run needs the whole corpus in host memory: candidates gathered on the host, a closed-form fit,
    Matryoshka prefixes. Otherwise every process reads only its own corpus shard from tensorstore."""
    return bool(signals & {"sampled_candidates", "teacher_candidates"}) or config.model.init != "identity" or \
        bool(config.loss.matryoshka_dims)


def contrasted_documents(config: Config, num_documents: int, train_qrels: Qrels) -> np.ndarray:
    """Documents the task softmax contrasts against: all, or those relevant to a training query."""
    if config.loss.negatives == "all":
        return np.ones(num_documents, bool)
    mask = np.zeros(num_documents, bool)
    mask[train_qrels.doc_rows[train_qrels.grades >= config.eval.relevance_level]] = True
    return mask


# The task's corpus table holds only the contrasted documents when they are at most this share of the corpus:
# the excluded rows would only add −inf logits, so the step's work shrinks by their share (the demo contrasts
# a third of its functions: 3× fewer FLOPs per step), and dev evaluation then keeps its own full index, an
# extra table of at most this share of the corpus.
COMPACT_FRACTION = 0.5


def task_rows(contrasted: np.ndarray) -> np.ndarray | None:
    """The rows to place as the task's corpus table: the contrasted ones when few enough, else None (all)."""
    count = int(contrasted.sum())
    return np.flatnonzero(contrasted) if count <= COMPACT_FRACTION * contrasted.shape[0] else None


def plan_training(config: Config, data: str) -> TrainingPlan:
    """Checks a run of `config` on `data` end to end without writing anything; see the module docstring."""
    dataset = Dataset(data)
    train_qrels, dev_qrels, dev_name = split_for_training(dataset, config)
    train_qrels, held_out = hold_out_documents(train_qrels, dev_qrels, config.train.new_document_fraction,
                                               config.train.seed, config.eval.relevance_level)
    _check_dataset_fields(config, dataset)
    terms = build_terms(config, dataset)
    if not terms or all(term.name == "recovery" for term in terms):
        raise InputError("no loss term is active (loss.task_weight is 0 and no distillation or teacher is set)",
                         field="config.loss")
    mesh = training_mesh(config)
    head = build_head(config.model, dataset.corpus_dim)
    dims = config.loss.matryoshka_dims
    scored_dim = dataset.corpus_dim + sum(k for k in set(dims) if k < dataset.corpus_dim)
    max_positives = int(np.diff(train_qrels.offsets).max(initial=1))
    contrasted = contrasted_documents(config, dataset.num_documents, train_qrels)
    rows = task_rows(contrasted) if CORPUS in needed_tables(terms) else None
    estimate = memory.estimate(
        config, head=head, query_dim=dataset.query_dim, corpus_dim=dataset.corpus_dim, scored_dim=scored_dim,
        num_documents=dataset.num_documents, task_documents=dataset.num_documents if rows is None else len(rows),
        num_positives=min(config.loss.max_positives, max_positives),
        dev_queries=dev_qrels.num_queries, corpus_on_device=CORPUS in needed_tables(terms),
        signals=needed_signals(terms), host_corpus=needs_host_corpus(config, needed_signals(terms)))
    memory.check_fits(estimate, config)
    return TrainingPlan(config=config, dataset=dataset, train_qrels=train_qrels, dev_qrels=dev_qrels,
                        dev_name=dev_name, held_out_documents=held_out, terms=terms, mesh=mesh, memory=estimate,
                        contrasted=contrasted, task_rows=rows)
