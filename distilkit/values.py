"""Reading recipe and command-line values: YAML as a user means it, then each value as its
field's type.

Two traps this module closes:

* YAML 1.1 (what PyYAML implements) reads ``no``, ``yes``, ``on`` and ``off`` as booleans, so
  ``save_strategy: no`` arrives as ``False``, and reads ``1e-4`` (no dot) as a string. Recipes
  are read with YAML 1.2's core rules instead: only ``true``/``false`` are booleans and
  ``1e-4`` is a number.
* A value of the wrong type fails late and obscurely (``--max_steps ten`` as a ``TypeError``
  deep in the Trainer). :func:`coerce` converts each value to the type of the field it sets,
  from the field's annotation, or fails at once naming the field, the value and what it must
  be. NaN and infinity are refused wherever a number goes.
"""
from __future__ import annotations

import enum
import math
import re
import types
import typing
from typing import Any, Optional

import yaml

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and floats (``1e-4``)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml(text: str, source: str = "recipe") -> Any:
    """Parse YAML text; a syntax error becomes one line with its line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source}: invalid YAML{where}: {problem}; a recipe is `key: value` "
                         "lines (see recipes/quickstart.yaml)") from None


def check_finite(value: Any, where: str) -> None:
    """Refuse NaN or infinity anywhere inside ``value`` (nested lists and mappings too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number; give a real value")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{where}[{i}]")


def _members(annotation: Any) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    return (origin or annotation,)


def _enum_values(members: tuple) -> Optional[list]:
    for m in members:
        if isinstance(m, type) and issubclass(m, enum.Enum):
            return [e.value for e in m]
    return None


def coerce(field: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` declares for ``field``, or a ``ValueError`` that
    names the field, the value and the type. ``None`` and types it does not know (lists,
    mappings, ``Any``) pass through unchanged."""
    check_finite(value, field)
    if value is None or annotation is Any:
        return value
    members = _members(annotation)
    choices = _enum_values(members)
    if bool in members and isinstance(value, bool):
        return value
    if bool in members and str not in members and not choices:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ValueError(f"{field}: {value!r} must be true or false")
    if int in members and float not in members and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+", value.strip()):
            return int(value)
        if str not in members and not choices:
            raise ValueError(f"{field}: {value!r} must be a whole number")
    if float in members and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value) if int not in members or isinstance(value, float) else value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
        if str not in members and not choices:
            raise ValueError(f"{field}: {value!r} must be a number")
    if choices is not None:
        if isinstance(value, bool) or (isinstance(value, str) and value not in choices):
            raise ValueError(f"{field}: {value!r} must be one of {', '.join(map(str, choices))}")
        return value
    if str in members and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value
