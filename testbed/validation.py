"""Validating YAML documents for people: every problem is listed at once, with its path and a fix.

Each checker records a problem in a :class:`Problems` list and returns a usable default, so one pass over a file
reports every mistake (unknown keys with a did-you-mean, wrong types, values out of range) instead of the first.
Used by the training experiment files and the `testbed run` experiment files.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = ["Problems", "UniqueKeyLoader", "boolean", "choice", "did_you_mean", "integer", "kind_of", "mapping",
           "number"]


class Problems:
    """The problems found so far, one line each (``path: message``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}" if path else message)


def _got(value: Any) -> str:
    """``a string 'x'``; just ``null`` for None."""
    return "null" if value is None else f"{kind_of(value)} {value!r}"


def kind_of(value: Any) -> str:
    """How a YAML value reads to a person: "an integer", "a mapping", "null"."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def did_you_mean(word: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match, else ``; known: a, b, c``."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known) or '(none)'}"


def mapping(p: Problems, path: str, value: Any, allowed: Sequence[str]) -> dict[str, Any]:
    """The keys of ``value`` that are in ``allowed``; each other key (and a non-mapping) is a problem."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        p.add(path, f"expected a mapping with keys {', '.join(allowed)}, got {kind_of(value)} {value!r}")
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or key not in allowed:
            p.add(f"{path}.{key}" if path else str(key), "unknown key" + did_you_mean(str(key), allowed))
        else:
            out[key] = item
    return out


def integer(p: Problems, path: str, value: Any, default: int | None, low: int, high: int | None = None,
            *, nullable: bool = True) -> int | None:
    """An integer in ``[low, high]``; absent (None) gives ``default``, unless ``nullable`` is False and there is
    no default (then it is required)."""
    if value is None and (nullable or default is not None):
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        p.add(path, f"expected an integer, got {_got(value)}")
        return default
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        p.add(path, f"must be {bound}, got {value}")
        return default
    return int(value)


def number(p: Problems, path: str, value: Any, default: float | None, low: float, high: float = math.inf,
           *, strict: bool = False, nullable: bool = True, bound_format: str = "g") -> float | None:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``strict``); None as in :func:`integer`.

    ``bound_format`` is how the message writes the bounds (``""``: as ``str`` does, ``0.0`` rather than ``0``)."""
    if value is None and (nullable or default is not None):
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        p.add(path, f"expected a finite number, got {_got(value)}")
        return default
    v = float(value)
    if v < low or v > high or (strict and v == low):
        lower = f"{'>' if strict else '>='} {format(low, bound_format)}"
        upper = f" and <= {format(high, bound_format)}" if math.isfinite(high) else ""
        p.add(path, f"must be {lower}{upper}, got {value}")
        return default
    return v


def choice(p: Problems, path: str, value: Any, default: str, choices: Sequence[str]) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(value, list(choices), n=1) if isinstance(value, str) else []
        p.add(path, f"expected one of {', '.join(choices)}, got {value!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else ""))
        return default
    return value


def boolean(p: Problems, path: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        p.add(path, f"expected true or false, got {kind_of(value)} {value!r}")
        return default
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)
