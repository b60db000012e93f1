"""The head registry: each head is one module of this package that registers a `HeadSpec`.

A spec says everything the rest of the system needs of a head: how to build its Flax module from the model
config, and how its trained parameters fold into the serving bundle's format (`esep_jax/export/format.py`:
a bundle serves `linear` and `mlp` heads with numpy alone). Forgetting the export side is impossible: a head
without `fold` cannot be registered. Adding a head is one new file here plus its `Literal` name (and any
fields) in `esep_jax.config.schema.ModelConfig`; `tests/test_heads.py` checks the two agree.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import flax.linen as nn
import numpy as np

from esep_jax.config import ModelConfig

# (member params with a leading member axis [E, ...], combination weights [E], input dim, output dim)
#   -> (the manifest's `head` entry, float32 tensors by name)
FoldFn = Callable[[dict, np.ndarray, int, int], tuple[dict, dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A registered head: `build(model_config, output_dim) -> nn.Module` and its export `fold`."""

    name: str
    build: Callable[[ModelConfig, int], nn.Module]
    fold: FoldFn


_discovered = False
_REGISTRY: dict[str, HeadSpec] = {}


def register(spec: HeadSpec) -> HeadSpec:
    """Adds a head (called at import by each head module)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"two heads are registered as {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Imports every module of this package once, so each head registers itself."""
    global _discovered
    if _discovered:  # not "if the registry is non-empty": importing one module directly registers only it
        return
    _discovered = True
    package = importlib.import_module("esep_jax.heads")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"esep_jax.heads.{module.name}")


def head_spec(name: str) -> HeadSpec:
    """The spec registered as `name` (`config.model.head`)."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown head {name!r} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def head_names() -> tuple[str, ...]:
    """Every registered head, sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def build_head(config: ModelConfig, output_dim: int) -> nn.Module:
    """The head `config.head` names, producing vectors of the corpus dimension."""
    return head_spec(config.head).build(config, output_dim)
