"""Loss terms as objects: each declares the batch signals and device tables it needs; the step sums them.

A term is built from the config (and the dataset it trains on, for what the dataset holds) by a factory
registered here (`@register_term`), which returns None when the config leaves the term off and raises an
`InputError` naming the field when the config asks for something the dataset lacks — before any workdir is
touched. At each (micro-)batch a term receives `TermInputs` — the head's output vectors for
the batch's queries, the batch fields, the device tables it asked for, a key, and the head itself for other
inputs — and returns its per-member sum over the batch's rows `[E]`; `weights` says how much each member's
total counts it. The loader builds only the signals the active terms ask for (`esep_jax/data/signals.py`) and
the trainer places only the tables they ask for. Adding a term is one new module in this package plus its
fields in `esep_jax.config.schema.LossConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import jax
import numpy as np

from esep_jax.config import Config
from esep_jax.data.dataset import Dataset

# Device tables a term may ask for (placed once by the trainer, passed to every step):
CORPUS = "corpus"  # (embeddings [N', d], logit bias [N']) of a ShardedCorpus: the rows the task loss scores
PAIRED = "paired"  # (source [M, d_q], target [M, d_c]) of every paired text, replicated


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a term sees of one (micro-)batch."""

    vectors: jax.Array  # [E, B, d_out]: every member's head output for the batch's queries (train mode)
    temperatures: jax.Array  # [E]
    batch: dict[str, jax.Array]  # the loader's fields: queries [B, d_in], positive_ids, ... (signals)
    tables: dict[str, Any]  # the device tables the active terms asked for
    key: jax.Array
    # The head (train mode, every member) applied to other inputs: forward(inputs [n, d_in], salt) -> [E, n, d].
    # Calls with the same inputs and salt share one result (two terms on the paired texts, say).
    forward: Callable[[jax.Array, int], jax.Array]
    mesh: Any = None  # the (data, corpus) mesh, for terms that shard their work (the full-corpus softmax)

    @property
    def scaled(self) -> jax.Array:
        """The vectors divided by each member's temperature (logits are then plain dot products)."""
        return self.vectors / self.temperatures[:, None, None]


class Term:
    """A loss term. Subclasses set `name` (its metric), `signals`, `tables`, and implement `__call__`."""

    name: str = ""
    order: int = 5  # where its value enters each member's sum (task 0 … regularisers last): a stable total
    signals: frozenset[str] = frozenset()  # batch signals (data/signals.py) the loader must add
    tables: frozenset[str] = frozenset()  # device tables (CORPUS, PAIRED) the step must receive

    def weights(self, member_values: dict[str, tuple[float, ...]]) -> np.ndarray:
        """`[E]` weight of this term in each member's total loss (default: 1)."""
        return np.ones(len(member_values["temperature"]), np.float32)

    def __call__(self, inputs: TermInputs) -> jax.Array:
        """The per-member sum of this term over the batch's rows, `[E]`."""
        raise NotImplementedError


TermFactory = Callable[[Config, "Dataset | None"], "Term | None"]
_discovered = False
_FACTORIES: dict[str, TermFactory] = {}


def register_term(name: str):
    """Registers a factory `(config, dataset) -> Term | None` under `name` (its module's decorator)."""
    def decorate(factory: TermFactory) -> TermFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"two loss terms are registered as {name!r}")
        _FACTORIES[name] = factory
        return factory
    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:  # not "if the registry is non-empty": importing one module directly registers only it
        return
    _discovered = True
    package = importlib.import_module("esep_jax.objectives")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"esep_jax.objectives.{module.name}")


def term_names() -> tuple[str, ...]:
    """Every registered term, sorted."""
    _discover()
    return tuple(sorted(_FACTORIES))


def build_terms(config: Config, dataset: "Dataset | None" = None) -> list[Term]:
    """The active terms of a config, ordered by `Term.order` then name (so the total is summed the same way).

    `dataset` tells terms what the training data holds (query targets, paired texts); without one, terms
    that depend on it refuse to build."""
    _discover()
    terms = [term for name in sorted(_FACTORIES) if (term := _FACTORIES[name](config, dataset)) is not None]
    terms.sort(key=lambda term: (term.order, term.name))
    names = [term.name for term in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"two active terms report the same metric: {names}")
    return terms


def needed_signals(terms: list[Term]) -> frozenset[str]:
    return frozenset().union(*(term.signals for term in terms))


def needed_tables(terms: list[Term]) -> frozenset[str]:
    return frozenset().union(*(term.tables for term in terms))
