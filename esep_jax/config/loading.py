"""Config files, command-line overrides and saved `config.json` files: one loader, one set of checks.

A config file is a Python module under `configs/` with `get_config(variant: str = "") -> Config` (the
`variant` after a colon: `--config configs/drift.py:demo`), usually `override(Config(), {...})` of a few
dotted fields. Command lines refine it with `--config.section.field=value`. Everywhere — file, command line,
saved JSON — an unknown field or a value of the wrong type is one `InputError` naming the field.

Config files are Python and run with the user's rights: they are trusted input, like a Makefile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import typing
from pathlib import Path
from types import ModuleType

from esep_jax.atomic import atomic_write_text
from esep_jax.config.schema import Config, validate
from esep_jax.config.types import conforms, describe, field_types, from_json, parse_text
from esep_jax.errors import InputError


def load_module(path: str) -> ModuleType:
    """Executes a config (or sweep) file as a module; a missing file or an error in it is one line."""
    file = Path(path)
    if not file.is_file():
        raise InputError("config file not found", file=path)
    spec = importlib.util.spec_from_file_location(f"esep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except InputError:
        raise
    except Exception as error:  # a config file is code: report where it broke, in one line
        raise InputError(f"error while loading: {type(error).__name__}: {error}", file=path) from None
    return module


def load_config_file(path: str, variant: str = "") -> Config:
    """`get_config(variant)` of a config file, checked (`path` may end in `:variant`)."""
    if ":" in Path(path).name:
        path, variant = str(path).rsplit(":", 1)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise InputError("a config file must define get_config() -> esep_jax.config.Config", file=path)
    takes_variant = bool(inspect.signature(module.get_config).parameters)
    if variant and not takes_variant:
        raise InputError(f"get_config() takes no variant, got {variant!r}", file=path)
    try:
        config = module.get_config(variant) if takes_variant else module.get_config()
    except InputError as error:
        raise InputError(str(error), file=path) from None
    except (TypeError, AttributeError, ValueError, KeyError) as error:
        # A frozen section refuses `c.loss.temprature = …` (AttributeError), a constructor an unknown keyword
        # (TypeError): both are typos in the file.
        raise InputError(f"get_config({variant!r}): {type(error).__name__}: {error}", file=path) from None
    if not isinstance(config, Config):
        raise InputError(f"get_config() returned {type(config).__name__}, expected Config", file=path)
    try:
        return validate(config)
    except InputError as error:
        raise InputError(str(error), file=path) from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The defaults or a config file's config, then `field=value` overrides (command-line text)."""
    config = Config() if path is None else load_config_file(path)
    changes = {}
    for text in overrides:
        if "=" not in text:
            raise InputError(f"expected --config.FIELD=VALUE, got --config.{text}")
        dotted, value = text.split("=", 1)
        kind = _field_kind(dotted)
        changes[dotted] = parse_text(value, kind, f"config.{dotted}")
    return validate(override(config, changes))


def override(config: Config, changes: dict[str, object]) -> Config:
    """A new config with dotted fields replaced: `override(Config(), {"loss.temperature": 0.02})`.

    Values are checked against the schema (an int is accepted for a float field; a list for a tuple).
    """
    sections: dict[str, dict] = {}
    for dotted, value in changes.items():
        kind = _field_kind(dotted)
        section, name = dotted.split(".")
        if isinstance(value, list):
            value = tuple(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is float:
            value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
        if not conforms(value, kind):
            raise InputError(f"expected {describe(kind)}, got {value!r}", field=f"config.{dotted}")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)
                                          for section, values in sections.items()})


def _field_kind(dotted: str):
    parts = dotted.split(".")
    sections = field_types(Config)
    if len(parts) != 2 or parts[0] not in sections:
        raise InputError(f"unknown config field (sections: {', '.join(sections)})", field=f"config.{dotted}")
    fields = field_types(sections[parts[0]])
    if parts[1] not in fields:
        raise InputError(f"unknown config field (known in {parts[0]}: {', '.join(sorted(fields))})",
                         field=f"config.{dotted}")
    return fields[parts[1]]


def to_dict(config: Config) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(data: dict, file: str | None = None) -> Config:
    """Rebuilds a Config from `to_dict` output, rejecting unknown fields and values of the wrong type."""
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", file=file)
    sections = {}
    for section, section_type in field_types(Config).items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise InputError("expected a JSON object", file=file, field=f"config.{section}")
        kinds = field_types(section_type)
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}", file=file, field=f"config.{section}")
        sections[section] = {name: from_json(value, kinds[name], f"config.{section}.{name}")
                             for name, value in values.items()}
    unknown = sorted(set(data) - set(field_types(Config)))
    if unknown:
        raise InputError(f"unknown section {unknown[0]!r}", file=file)
    try:
        changes = {f"{section}.{name}": value for section, values in sections.items() for name, value in values.items()}
        return validate(override(Config(), changes))
    except InputError as error:
        raise InputError(str(error), file=file) from None


def save_config(config: Config, path: Path) -> None:
    """Writes the resolved config as JSON, atomically."""
    atomic_write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def read_config(path: Path | str) -> Config:
    """Reads a config saved by `save_config` (one line naming the file and field if it was edited wrongly)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read saved config: {error}", file=str(path)) from None
    return from_dict(data, file=str(path))


def differences(old: Config, new: Config) -> list[str]:
    """`section.field: old -> new` for every field that differs."""
    a, b = to_dict(old), to_dict(new)
    return [f"{section}.{name}: {a[section][name]!r} -> {b[section][name]!r}"
            for section in a for name in a[section] if a[section][name] != b[section][name]]
