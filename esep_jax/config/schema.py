"""The one typed configuration schema; every default lives here.

Each section is a frozen, keyword-only dataclass: a config is a value, a typo in a field name is an error
wherever it is made (assigning `c.loss.temprature` in a config file raises, as does an unknown name on the
command line or in a saved `config.json`), and choices are `Literal` types, so the schema itself says what is
allowed. (Not `slots=True`: on Python 3.11 a frozen slotted dataclass answers any assignment with an unrelated
`super()` TypeError instead of naming the field; frozen alone already refuses new attributes.) Lists are tuples. `validate` adds the checks that types
alone cannot express (ranges, fields that only make sense together); dataset-dependent checks happen in
`esep_jax.training.plan` before a workdir is touched.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from esep_jax.errors import InputError

_SECTION = dict(frozen=True, kw_only=True)

HeadKind = Literal["linear", "lowrank", "mlp", "diagonal"]
Initialiser = Literal["identity", "paired_ridge", "paired_procrustes", "mean_shift", "supervised_ridge",
                      "supervised_procrustes"]
TaskLoss = Literal["full_corpus", "sampled", "in_batch"]


@dataclasses.dataclass(**_SECTION)
class ModelConfig:
    """The searching module `f` applied to query embeddings (heads: `esep_jax/heads/`)."""

    head: HeadKind = "linear"
    rank: int = 32  # lowrank: rank of U Vᵀ
    hidden_dim: int = 512  # mlp: width of the hidden layer
    dropout: float = 0.0  # mlp: dropout on the hidden layer during training
    # An output bias b adds <b, d> to every document's score: a pure document prior that lifts documents seen
    # as positives in training over unseen ones. Off by default; useful for drift maps (a mean shift).
    use_bias: bool = False
    # Where a linear head starts: the identity, or a closed-form map fitted on the training split (see
    # esep_jax/training/initialisers.py). Dev early stopping then starts from that map.
    init: Initialiser = "identity"
    # The in-domain gate (esep_jax/heads/gate.py): "knn" gives each query as much of the head as it resembles
    # the training queries (mean cosine to its `gate_neighbours` nearest), so queries of another domain keep
    # their base embedding — what keeps zero-shot transfer within half a point. "none" for query drift, where
    # the base (B's raw query) is meaningless on A's index.
    gate: Literal["knn", "none"] = "knn"
    gate_neighbours: int = 10
    # Training queries below this quantile of their own similarity are not fully on. 0.05 rather than 0.01: the
    # smallest at which the NFCorpus head stops losing on pystdlib dev queries, for 0.04 / 0.13 points of
    # NFCorpus / pystdlib in-domain dev gain (tools/studies/gate_study.py; docs/generalisation.md).
    gate_quantile: float = 0.05
    gate_width: float = 0.1  # similarity band over which the head fades out below that
    gate_anchors: int = 16384  # at most this many training queries (a seeded sample) are kept as anchors


@dataclasses.dataclass(**_SECTION)
class LossConfig:
    """What the head is trained to do: the sum of the active terms in `esep_jax/objectives/`."""

    # full_corpus: exact softmax over every document (the corpus lives on the devices);
    # sampled: softmax over each query's positives + `hard_negatives` + `random_negatives` gathered on the host
    # (log-Q corrected), for corpora too large for device memory; in_batch: the batch's sampled positives.
    kind: TaskLoss = "full_corpus"
    # Which documents the full-corpus softmax contrasts against: only those judged relevant to some training
    # query ("judged"), or every document ("all"). With "all", documents never relevant in training are pushed
    # down for every query — a document prior that hurts documents added after training (README "Heads that
    # generalise": judged gains 1 point on NFCorpus's new-documents view and 1.4 on pystdlib's held-out modules).
    negatives: Literal["all", "judged"] = "judged"
    temperature: float = 0.03
    # Pulls f(q) towards q: the head departs from the base retrieval only where the data asks for it.
    recovery_weight: float = 0.5
    # Logit adjustment (Menon et al., 2021): adds logit_adjustment · log(π_j + smoothing / N) to document j's
    # training logit, π_j its share of the training target mass, so the head need not learn the document prior.
    # Measured and left off: `negatives=judged` (its hard limit) did better on every view.
    logit_adjustment: float = 0.0
    logit_adjustment_smoothing: float = 1.0
    # Per query, at most this many positives enter the target distribution (sampled by step if more).
    max_positives: int = 64
    grade_weighting: Literal["linear", "uniform"] = "linear"  # linear: weight ∝ grade
    z_loss: float = 0.0  # weight of LSE² (keeps logits bounded in low precision; full_corpus only)
    task_weight: float = 1.0  # weight of the retrieval loss above; 0 trains on the other signals alone
    # sampled: a candidates table written by `esep-jax mine` (its lists join each query's softmax).
    hard_negatives: str = ""
    # sampled: documents drawn uniformly per query from the contrasted set A; their logits get + log(|A| / R),
    # the log-Q correction, so the sampled normaliser estimates the full-corpus one without bias.
    random_negatives: int = 64
    # Teacher distillation: a candidates table imported with `esep-jax teacher`. Adds teacher_weight ·
    # KL(teacher ‖ head) over those candidates, the head's logits scaled by `temperature`, the teacher's by
    # `teacher_temperature`.
    teacher: str = ""
    teacher_weight: float = 1.0
    teacher_temperature: float = 1.0
    # Distillation onto target vectors (query drift): "" off | mse: ‖f(q_B) − q_A‖² | cosine: 1 − cos.
    # Targets are the dataset's `queries/targets` (A's embedding of each query) and/or its paired texts.
    distill: Literal["", "mse", "cosine"] = ""
    distill_weight: float = 1.0
    # Listwise distillation over the paired texts (query drift, B the stronger encoder): B's softmax over the
    # paired texts' B embeddings, softmax(<q_B, p_B> / listwise_temperature), teaches the head's softmax over
    # their A embeddings, softmax(<f(q_B), p_A> / τ). `listwise_queries`: whose distributions are matched —
    # the training queries, the paired texts themselves as unlabelled pseudo-queries, or both.
    listwise_weight: float = 0.0
    listwise_temperature: float = 0.05
    listwise_queries: Literal["train", "paired", "both"] = "both"
    # Listwise distillation over the whole corpus from A's own query vectors (query drift; needs
    # `queries/targets`): softmax(<q_A, c> / corpus_listwise_temperature) over A's index teaches the head's
    # softmax(<f(q_B), c> / τ). It needs no paired texts, so it carries over when few documents are encoded
    # by both models (docs/drift_e5.md: NFCorpus MiniLM → e5 with 10 % paired texts).
    corpus_listwise_weight: float = 0.0
    corpus_listwise_temperature: float = 0.05
    # Matryoshka: prefix sizes (e.g. (64, 128, 256)); the retrieval loss is averaged over these prefixes of the
    # output and corpus dimensions and the full dimension, so one head also serves truncated indexes.
    matryoshka_dims: tuple[int, ...] = ()


@dataclasses.dataclass(**_SECTION)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    # A low rate and strong decay of the residual (towards the identity head) keep a head from hurting other
    # datasets (tools/studies/zero_shot_study.py).
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 10.0  # decoupled (AdamW): each step shrinks the residual by lr·wd
    grad_clip_norm: float = 1.0
    end_learning_rate_fraction: float = 0.0


@dataclasses.dataclass(**_SECTION)
class TrainConfig:
    """The loop: how long, how often to evaluate and save, when to stop."""

    seed: int = 0
    batch_size: int = 256
    num_steps: int = 2000
    train_split: str = "train"
    # Early stopping and model selection use this split. If the dataset has no such split, this fraction of
    # the training queries is held out instead (chosen by seed, so a resumed run holds out the same ones).
    dev_split: str = "dev"
    holdout_fraction: float = 0.1
    # The new-documents dev view: this fraction of the documents relevant to dev queries lose their training
    # judgements (seeded), so dev can show how the head ranks documents it never saw as positives. Training
    # reports the head against the identity on it; a head that loses more than `harm_tolerance` of nDCG@10
    # there, beyond noise (a one-sided paired t-test over the view's queries), is flagged harmful, and export
    # refuses it unless told otherwise. 0 holds out nothing (the view then has only naturally unseen documents).
    new_document_fraction: float = 0.1
    harm_tolerance: float = 0.005
    eval_every: int = 100
    patience: int = 5  # evaluations without dev improvement before stopping
    # A dev score counts as an improvement only when it beats the best by more than this (the selected step is
    # then the earliest within it of the best: on a flat plateau, the less-trained head).
    min_improvement: float = 0.0
    select_metric: str = "ndcg@10"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 25
    corpus_dtype: Literal["float32", "bfloat16"] = "float32"  # the device-resident corpus
    # Devices form a (data, corpus) mesh: corpus rows are split over `corpus_shards` devices, queries over
    # the remaining factor. 1 = the corpus is replicated and every device takes part of the batch.
    corpus_shards: int = 1
    corpus_chunk: int = 8192  # corpus rows scored at once inside the full-corpus softmax scan
    micro_batch_size: int = 0  # 0: the whole batch at once; else gradients are summed over micro-batches
    prefetch: int = 2  # batches read ahead from tensorstore
    # Refuse a run whose estimated peak memory exceeds this fraction of the memory available to it (host RAM
    # on CPU, the device's memory on an accelerator); see esep_jax/training/memory.py.
    memory_fraction: float = 0.9


@dataclasses.dataclass(**_SECTION)
class EvalConfig:
    """Exact retrieval for evaluation."""

    top_k: int = 1000  # depth of the run; trec_eval conventions assume 1000
    query_chunk: int = 1024
    corpus_chunk: int = 65536
    relevance_level: int = 1  # grades >= this count as relevant for binary measures


@dataclasses.dataclass(**_SECTION)
class EnsembleConfig:
    """Members trained together in one compiled program (a leading member axis on parameters and optimiser
    state). Member i starts from seed `train.seed + i`. A per-member field holds one value per member; empty
    means every member uses the base value from its section (`PER_MEMBER`)."""

    members: int = 1
    learning_rate: tuple[float, ...] = ()  # base: optim.learning_rate
    weight_decay: tuple[float, ...] = ()  # base: optim.weight_decay
    temperature: tuple[float, ...] = ()  # base: loss.temperature
    recovery_weight: tuple[float, ...] = ()  # base: loss.recovery_weight
    dropout: tuple[float, ...] = ()  # base: model.dropout (mlp heads)
    # After training, members are combined by greedy ensemble selection on dev (Caruana et al., 2004):
    # "greedy" on the selection metric; "worst_case" on the smaller of the in-domain gain and the gain on the
    # new-documents dev view (the combination that hurts neither); "mean" for the plain mean of all members.
    combine: Literal["greedy", "worst_case", "mean"] = "greedy"


@dataclasses.dataclass(**_SECTION)
class Config:
    """Everything a run needs besides its data and workdir."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)


# The retrieval measures and cutoffs evaluation reports (esep_jax/evaluation/metrics.py); `train.select_metric`
# is one of them.
MEASURES = ("ndcg", "mrr", "recall", "map", "p")
CUTOFFS = (1, 3, 5, 10, 100, 1000)

# Per-member ensemble fields and the base field each defaults to.
PER_MEMBER = {"learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
              "temperature": "loss.temperature", "recovery_weight": "loss.recovery_weight",
              "dropout": "model.dropout"}


def get_field(config, dotted: str):
    """The value of a dotted field such as `optim.learning_rate`."""
    value = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def member_values(config: Config) -> dict[str, tuple[float, ...]]:
    """Every per-member hyperparameter as `ensemble.members` floats."""
    members = config.ensemble.members
    values = {}
    for name, base in PER_MEMBER.items():
        given = getattr(config.ensemble, name)
        if not given:
            values[name] = (float(get_field(config, base)),) * members
        elif len(given) != members:
            raise InputError(f"{len(given)} values for {members} members", field=f"config.ensemble.{name}")
        else:
            values[name] = tuple(float(v) for v in given)
    return values


_POSITIVE = ("loss.temperature", "loss.max_positives", "loss.teacher_temperature", "loss.listwise_temperature",
             "loss.corpus_listwise_temperature",
             "optim.learning_rate", "train.batch_size", "train.num_steps", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.corpus_shards",
             "train.corpus_chunk", "eval.top_k", "eval.query_chunk", "eval.corpus_chunk", "ensemble.members",
             "model.rank", "model.hidden_dim", "train.memory_fraction", "model.gate_neighbours", "model.gate_width",
             "model.gate_anchors", "loss.logit_adjustment_smoothing")
_NON_NEGATIVE = ("loss.recovery_weight", "loss.z_loss", "loss.task_weight", "loss.teacher_weight",
                 "loss.distill_weight", "loss.listwise_weight", "loss.corpus_listwise_weight",
                 "loss.random_negatives", "optim.weight_decay",
                 "optim.warmup_steps", "optim.grad_clip_norm", "optim.end_learning_rate_fraction",
                 "train.micro_batch_size", "train.prefetch", "train.patience", "model.dropout", "loss.logit_adjustment",
                 "train.new_document_fraction", "train.harm_tolerance", "train.min_improvement")


def validate(config: Config) -> Config:
    """Checks ranges and combinations that the types alone do not capture; returns the config."""
    from esep_jax.config.types import check_types  # the type walk is shared with the loaders

    check_types(config)
    for dotted in _POSITIVE:
        value = get_field(config, dotted)
        if not value > 0:  # NaN fails too
            raise InputError(f"must be > 0, got {value!r}", field=f"config.{dotted}")
    for dotted in _NON_NEGATIVE:
        value = get_field(config, dotted)
        if not value >= 0:
            raise InputError(f"must be >= 0, got {value!r}", field=f"config.{dotted}")
    selectable = [f"{m}@{k}" for m in MEASURES for k in CUTOFFS if k <= config.eval.top_k]
    if config.train.select_metric not in selectable:
        raise InputError(f"must be one of {', '.join(selectable)}", field="config.train.select_metric")
    micro, batch = config.train.micro_batch_size, config.train.batch_size
    if micro and batch % micro:
        raise InputError(f"must divide train.batch_size ({batch}), got {micro}", field="config.train.micro_batch_size")
    if micro not in (0, batch) and config.loss.kind != "full_corpus":
        raise InputError("micro-batching needs loss.kind=full_corpus (in-batch negatives span the whole batch; "
                         "the sampled softmax is bounded by its candidates)", field="config.train.micro_batch_size")
    values = member_values(config)
    if min(values["temperature"]) <= 0 or min(values["learning_rate"]) <= 0:
        raise InputError("temperatures and learning rates must be > 0", field="config.ensemble")
    if min(values["weight_decay"]) < 0 or min(values["recovery_weight"]) < 0:
        raise InputError("weight decays and recovery weights must be >= 0", field="config.ensemble")
    if not all(0 <= rate < 1 for rate in values["dropout"]):
        raise InputError("dropout rates must be in [0, 1)", field="config.ensemble.dropout")
    if any(k <= 0 for k in config.loss.matryoshka_dims):
        raise InputError("prefix sizes must be > 0", field="config.loss.matryoshka_dims")
    if config.model.init != "identity" and config.model.head != "linear":
        raise InputError("closed-form initialisers set a linear head", field="config.model.init")
    if config.loss.hard_negatives and config.loss.kind != "sampled":
        raise InputError("hard negatives join the sampled softmax: set loss.kind=sampled",
                         field="config.loss.hard_negatives")
    if not 0.0 < config.train.holdout_fraction < 1.0:
        raise InputError("must be in (0, 1)", field="config.train.holdout_fraction")
    if not config.train.new_document_fraction < 1.0:
        raise InputError("must be in [0, 1)", field="config.train.new_document_fraction")
    if not 0.0 <= config.model.gate_quantile < 1.0:
        raise InputError("must be in [0, 1)", field="config.model.gate_quantile")
    if config.loss.logit_adjustment and config.loss.kind != "full_corpus":
        raise InputError("logit adjustment applies to loss.kind=full_corpus", field="config.loss.logit_adjustment")
    if not config.train.memory_fraction <= 1.0:
        raise InputError("must be in (0, 1]", field="config.train.memory_fraction")
    return config
