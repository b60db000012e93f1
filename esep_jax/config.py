"""The one typed configuration schema; every default lives here.

A config file under `configs/` is a Python module with `get_config() -> Config` that starts from these
defaults and changes a few fields. Command lines refine it with `--config.section.field=value`; an unknown
field or a value of the wrong type is an error, never a silently new field. The resolved config is saved
as `config.json` beside each run so evaluation, export and resume rebuild exactly the same model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import typing
from pathlib import Path

from esep_jax.atomic import atomic_write_text
from esep_jax.errors import InputError


@dataclasses.dataclass
class ModelConfig:
    """The searching module `f` applied to query embeddings."""

    head: str = "linear"  # linear | lowrank | mlp
    rank: int = 32  # lowrank: rank of U Vᵀ
    hidden_dim: int = 512  # mlp: width of the hidden layer
    dropout: float = 0.0  # mlp: dropout on the hidden layer during training
    # An output bias b adds <b, d> to every document's score: a pure document prior that lifts documents seen
    # as positives in training over unseen ones. Off by default; useful for drift maps (a mean shift).
    use_bias: bool = False
    # Where a linear head starts: the identity, or a closed-form map fitted on the training split
    # (paired_ridge | paired_procrustes | mean_shift | supervised_ridge | supervised_procrustes; see
    # esep_jax/train/initialisers.py). Dev early stopping then starts from that map.
    init: str = "identity"


@dataclasses.dataclass
class LossConfig:
    """What the head is trained to do."""

    # full_corpus: exact softmax over every document (the corpus lives on the devices);
    # sampled: softmax over each query's positives + `hard_negatives` + `random_negatives` gathered on the host
    # (log-Q corrected), for corpora too large for device memory; in_batch: the batch's sampled positives.
    kind: str = "full_corpus"
    # Which documents the full-corpus softmax contrasts against: every document ("all"), or only those judged
    # relevant to some training query ("judged"). With "all", documents never relevant in training are pushed
    # down for every query — a document prior that hurts queries whose relevant documents are unseen.
    negatives: str = "all"
    temperature: float = 0.05
    # Pulls f(q) towards q: the head departs from the base retrieval only where the data asks for it.
    recovery_weight: float = 1.0
    # Per query, at most this many positives enter the target distribution (sampled by step if more).
    max_positives: int = 64
    grade_weighting: str = "linear"  # linear: weight ∝ grade | uniform: every positive alike
    z_loss: float = 0.0  # weight of LSE² (keeps logits bounded in low precision; full_corpus only)
    task_weight: float = 1.0  # weight of the retrieval loss above; 0 trains on the other signals alone
    # sampled: a candidates table written by `esep-jax mine` (its lists join each query's softmax).
    hard_negatives: str = ""
    # sampled: documents drawn uniformly per query from the contrasted set A; their logits get + log(|A| / R),
    # the log-Q correction, so the sampled normaliser estimates the full-corpus one without bias.
    random_negatives: int = 64
    # Teacher distillation: a candidates table imported with `esep-jax teacher` (a stronger scorer's scores
    # over each query's candidates). Adds teacher_weight · KL(teacher ‖ head) over those candidates, both
    # softmaxes temperature-scaled (the head's by `temperature`, the teacher's by `teacher_temperature`).
    teacher: str = ""
    teacher_weight: float = 1.0
    teacher_temperature: float = 1.0
    # Distillation onto target vectors (query drift): "" off | mse: ‖f(q_B) − q_A‖² | cosine: 1 − cos.
    # Targets are the dataset's `queries/targets` (A's embedding of each query) and/or its paired texts.
    distill: str = ""
    distill_weight: float = 1.0
    # Listwise distillation over the paired texts (query drift, when B is the stronger encoder): for each
    # query, B's own similarity distribution over the paired texts' B embeddings, softmax(<q_B, p_B> / τ_t)
    # with τ_t = `listwise_temperature`, is the teacher of the head's distribution over their A embeddings,
    # softmax(<f(q_B), p_A> / τ); adds listwise_weight · KL(teacher ‖ head). It transfers how B ranks texts,
    # not where A puts a query, so it helps even where A's own query embeddings are the weak side. With the
    # corpus as the paired texts this is B's native full-corpus ranking. `listwise_queries`: whose
    # distributions are matched — the training queries, the paired texts themselves as unlabelled
    # pseudo-queries (a batch of them per step), or both.
    listwise_weight: float = 0.0
    listwise_temperature: float = 0.05
    listwise_queries: str = "both"
    # Matryoshka: comma-separated prefix sizes (e.g. "64,128,256"); the retrieval loss is averaged over
    # these prefixes of the output and corpus dimensions and the full dimension, so one head also serves
    # indexes truncated to any of them.
    matryoshka_dims: str = ""


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    # A low rate and strong decay of the residual (towards the identity head) are what keeps a head from
    # hurting other datasets (tools/zero_shot_study.py): NFCorpus gains as much as with 1e-3 / 1e-4, and
    # zero-shot transfer stays within a point of the base embeddings.
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 10.0  # decoupled (AdamW): each step shrinks the residual by lr·wd
    grad_clip_norm: float = 1.0
    end_learning_rate_fraction: float = 0.0


@dataclasses.dataclass
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
    eval_every: int = 100
    patience: int = 5  # evaluations without dev improvement before stopping
    select_metric: str = "ndcg@10"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 25
    corpus_dtype: str = "float32"  # dtype of the device-resident corpus: float32 | bfloat16
    # Devices form a (data, corpus) mesh: corpus rows are split over `corpus_shards` devices, queries over
    # the remaining factor. 1 = the corpus is replicated and every device takes part of the batch.
    corpus_shards: int = 1
    corpus_chunk: int = 8192  # corpus rows scored at once inside the full-corpus softmax scan
    micro_batch_size: int = 0  # 0: the whole batch at once; else gradients are summed over micro-batches
    prefetch: int = 2  # batches read ahead from tensorstore


@dataclasses.dataclass
class EvalConfig:
    """Exact retrieval for evaluation."""

    top_k: int = 1000  # depth of the run; trec_eval conventions assume 1000
    query_chunk: int = 1024
    corpus_chunk: int = 65536
    relevance_level: int = 1  # grades >= this count as relevant for binary measures


@dataclasses.dataclass
class EnsembleConfig:
    """Members trained together in one compiled program (a leading member axis on parameters and optimiser
    state). Member i starts from seed `train.seed + i`. A per-member field is a comma-separated list with one
    value per member; empty means every member uses the base value from its section."""

    members: int = 1
    learning_rate: str = ""  # e.g. "1e-3,3e-4,1e-4"; base: optim.learning_rate
    weight_decay: str = ""  # base: optim.weight_decay
    temperature: str = ""  # base: loss.temperature
    recovery_weight: str = ""  # base: loss.recovery_weight
    dropout: str = ""  # base: model.dropout (mlp heads)
    # After training, members are combined by greedy ensemble selection on dev (Caruana et al., 2004):
    # "greedy", or "mean" for the plain mean of all members' query vectors.
    combine: str = "greedy"


PER_MEMBER = {"learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
              "temperature": "loss.temperature", "recovery_weight": "loss.recovery_weight",
              "dropout": "model.dropout"}


def member_values(config: "Config") -> dict[str, list[float]]:
    """Every per-member hyperparameter as a list of `ensemble.members` floats."""
    members = config.ensemble.members
    values = {}
    for name, base in PER_MEMBER.items():
        text = getattr(config.ensemble, name).strip()
        if not text:
            values[name] = [float(_get(config, base))] * members
            continue
        try:
            parsed = [float(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"expected comma-separated numbers, got {text!r}", field=f"config.ensemble.{name}") from None
        if len(parsed) != members:
            raise InputError(f"{len(parsed)} values for {members} members", field=f"config.ensemble.{name}")
        values[name] = parsed
    return values


def matryoshka_dims(config: "Config") -> list[int]:
    """The Matryoshka prefix sizes, ascending, without the full dimension (empty: off)."""
    text = config.loss.matryoshka_dims.strip()
    if not text:
        return []
    try:
        dims = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}", field="config.loss.matryoshka_dims") from None
    if dims[0] <= 0:
        raise InputError("prefix sizes must be > 0", field="config.loss.matryoshka_dims")
    return dims


@dataclasses.dataclass
class Config:
    """Everything a run needs besides its data and workdir."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)


CHOICES = {
    "model.head": ("linear", "lowrank", "mlp"),
    "model.init": ("identity", "paired_ridge", "paired_procrustes", "mean_shift", "supervised_ridge",
                   "supervised_procrustes"),
    "loss.kind": ("full_corpus", "in_batch", "sampled"),
    "loss.distill": ("", "mse", "cosine"),
    "loss.listwise_queries": ("train", "paired", "both"),
    "loss.negatives": ("all", "judged"),
    "loss.grade_weighting": ("linear", "uniform"),
    "train.corpus_dtype": ("float32", "bfloat16"),
    "ensemble.combine": ("greedy", "mean"),
}


def validate(config: Config) -> Config:
    """Checks choices and ranges that types alone do not capture."""
    for dotted, allowed in CHOICES.items():
        value = _get(config, dotted)
        if value not in allowed:
            raise InputError(f"must be one of {', '.join(allowed)}, got {value!r}", field=f"config.{dotted}")
    positive = ["loss.temperature", "train.batch_size", "train.num_steps", "train.eval_every",
                "train.checkpoint_every", "train.log_every", "eval.top_k", "loss.max_positives",
                "train.corpus_shards", "train.corpus_chunk", "ensemble.members",
                "optim.learning_rate", "train.keep_checkpoints", "eval.query_chunk", "eval.corpus_chunk"]
    for dotted in positive:
        if not _get(config, dotted) > 0:
            raise InputError(f"must be > 0, got {_get(config, dotted)!r}", field=f"config.{dotted}")
    from esep_jax.eval.metrics import DEFAULT_CUTOFFS, MEASURES

    selectable = [f"{m}@{k}" for m in MEASURES for k in DEFAULT_CUTOFFS if k <= config.eval.top_k]
    if config.train.select_metric not in selectable:
        raise InputError(f"must be one of {', '.join(selectable)}", field="config.train.select_metric")
    micro = config.train.micro_batch_size
    if micro < 0 or (micro and config.train.batch_size % micro):
        raise InputError(f"must divide train.batch_size ({config.train.batch_size}), got {micro}",
                         field="config.train.micro_batch_size")
    if micro and micro != config.train.batch_size and config.loss.kind == "in_batch":
        raise InputError("in-batch negatives span the whole batch: micro-batching needs loss.kind=full_corpus",
                         field="config.train.micro_batch_size")
    values = member_values(config)
    if min(values["temperature"]) <= 0 or min(values["learning_rate"]) <= 0:
        raise InputError("temperatures and learning rates must be > 0", field="config.ensemble")
    if not all(0 <= rate < 1 for rate in values["dropout"]):
        raise InputError("dropout rates must be in [0, 1)", field="config.ensemble.dropout")
    if config.loss.z_loss < 0:
        raise InputError("must be >= 0", field="config.loss.z_loss")
    for dotted in ("loss.task_weight", "loss.teacher_weight", "loss.distill_weight", "loss.random_negatives",
                   "loss.listwise_weight"):
        if _get(config, dotted) < 0:
            raise InputError(f"must be >= 0, got {_get(config, dotted)!r}", field=f"config.{dotted}")
    for dotted in ("loss.teacher_temperature", "loss.listwise_temperature"):
        if _get(config, dotted) <= 0:
            raise InputError("must be > 0", field=f"config.{dotted}")
    matryoshka_dims(config)  # parses, or names the field
    if config.model.init != "identity" and config.model.head != "linear":
        raise InputError("closed-form initialisers set a linear head", field="config.model.init")
    if config.loss.kind == "sampled" and config.train.micro_batch_size not in (0, config.train.batch_size):
        raise InputError("micro-batching applies to loss.kind=full_corpus", field="config.train.micro_batch_size")
    if not 0.0 < config.train.holdout_fraction < 1.0:
        raise InputError("must be in (0, 1)", field="config.train.holdout_fraction")
    return config


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads `get_config()` from a Python file (or the defaults), then applies `field=value` overrides."""
    config = Config() if path is None else _load_python_config(path)
    for override in overrides:
        if "=" not in override:
            raise InputError(f"expected --config.FIELD=VALUE, got --config.{override}")
        dotted, text = override.split("=", 1)
        _set(config, dotted, text)
    return validate(config)


def sibling_config_module(config_file: str, name: str):
    """The config module `name.py` beside `config_file`, for config files that build on one another
    (e.g. `drift_demo.py` applies `drift.py`'s settings to `demo.py`'s config)."""
    path = Path(config_file).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"esep_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_python_config(path: str) -> Config:
    file = Path(path)
    if not file.is_file():
        raise InputError("config file not found", file=path)
    spec = importlib.util.spec_from_file_location(f"esep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InputError("a config file must define get_config() -> esep_jax.config.Config", file=path)
    config = module.get_config()
    if not isinstance(config, Config):
        raise InputError(f"get_config() returned {type(config).__name__}, expected Config", file=path)
    return config


def _get(config: Config, dotted: str):
    value = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def _set(config: Config, dotted: str, text: str) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for name in parents:
        if not dataclasses.is_dataclass(target) or name not in _field_types(target):
            raise InputError(f"unknown config section {name!r}", field=f"config.{dotted}")
        target = getattr(target, name)
    fields = _field_types(target) if dataclasses.is_dataclass(target) else {}
    if leaf not in fields or dataclasses.is_dataclass(getattr(target, leaf)):
        known = ", ".join(sorted(fields)) or "none"
        raise InputError(f"unknown config field (known here: {known})", field=f"config.{dotted}")
    setattr(target, leaf, _parse_value(text, fields[leaf], f"config.{dotted}"))


def _field_types(obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _parse_value(text: str, kind: type, field: str):
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return str(text)
    except ValueError:
        raise InputError(f"cannot parse {text!r} as {kind.__name__}", field=field) from None


def get_field(config: Config, dotted: str):
    """The value of a dotted field such as `optim.learning_rate`."""
    return _get(config, dotted)


def set_field(config: Config, dotted: str, text: str) -> None:
    """Sets a dotted field from text, with the same type checks as a command-line override."""
    _set(config, dotted, text)


def to_dict(config: Config) -> dict:
    """The config as plain JSON-able data."""
    return dataclasses.asdict(config)


def from_dict(data: dict) -> Config:
    """Rebuilds a Config saved by `save_config`, rejecting unknown fields."""
    sections = {}
    for field in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[field.name]
        values = dict(data.get(field.name, {}))
        unknown = set(values) - {f.name for f in dataclasses.fields(section_type)}
        if unknown:
            raise InputError(f"unknown fields {sorted(unknown)}", field=f"config.{field.name}")
        sections[field.name] = section_type(**values)
    return validate(Config(**sections))


def save_config(config: Config, path: Path) -> None:
    """Writes the resolved config as JSON, atomically."""
    atomic_write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def read_config(path: Path) -> Config:
    """Reads a config saved by `save_config`."""
    try:
        return from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read saved config: {error}", file=str(path)) from None
