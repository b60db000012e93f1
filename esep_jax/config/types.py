"""Typed values for the config schema: checking a field's value against its annotation, parsing one from
command-line text, and rebuilding a section from JSON. One walk over the type hints serves all three."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

from esep_jax.errors import InputError


@functools.cache
def field_types(section_type: type) -> dict[str, object]:
    """`{field name: annotation}` of a config section (a dataclass type)."""
    hints = typing.get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)}


def describe(kind) -> str:
    """A type as a user reads it: `float`, `one of 'a', 'b'`, `comma-separated ints`."""
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"comma-separated {typing.get_args(kind)[0].__name__}s"
    return getattr(kind, "__name__", str(kind))


def conforms(value, kind) -> bool:
    """Whether `value` is a valid value of annotation `kind` (an int is a valid float; a bool is no number)."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return value in typing.get_args(kind) and type(value) is type(typing.get_args(kind)[0])
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_types(config) -> None:
    """Raises an InputError naming the first field whose value does not fit its annotation."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for name, kind in field_types(type(values)).items():
            value = getattr(values, name)
            if not conforms(value, kind):
                raise InputError(f"expected {describe(kind)}, got {value!r}", field=f"config.{section.name}.{name}")


def parse_text(text: str, kind, field: str):
    """A value of annotation `kind` from command-line text (`--config.loss.temperature=0.1`)."""
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            item = typing.get_args(kind)[0]
            return tuple(parse_text(part.strip(), item, field) for part in text.split(",") if part.strip())
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
        if origin is typing.Literal and text not in typing.get_args(kind):
            raise ValueError(text)
        return str(text)
    except ValueError:
        raise InputError(f"cannot parse {text!r} as {describe(kind)}", field=field) from None


def from_json(value, kind, field: str):
    """A value of annotation `kind` from JSON (lists become tuples; a comma string is read as text)."""
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):  # config.json files of esep-jax 0.1 held lists as comma strings
            return parse_text(value, kind, field)
        if isinstance(value, list):
            return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return value  # reported by validate() with the field's range
    return value
