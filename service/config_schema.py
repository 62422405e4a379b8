"""A small declarative schema for the YAML config, so every rule lives in one table.

`validate(schema, data, path)` walks the document, fills defaults and collects one
`ConfigProblem` per broken rule, each naming the key path, what was expected and
what was found. Provider modules declare their own section schema with the same
`Field` so that `providers.<name>` is checked by the module that uses it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

REQUIRED = object()

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
               "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"config: {self.path}: expected {self.expected}, found {self.found}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_duration(value: Any) -> float:
    """'5s', '2h', '250ms', '1.5m' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """'10MB', '10MiB', '512K' or a bare integer of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError
    unit = (match.group(2) or "").upper().rstrip("B") if (match.group(2) or "").upper() != "B" else "B"
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class Field:
    """One leaf of the schema.

    kind: str | int | float | bool | duration | size | list[str] | map[str,str] | any
    """

    kind: str
    default: Any = REQUIRED
    choices: tuple = ()
    minimum: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns a rule text when broken
    secret: bool = False  # a bad value is not shown at all
    shown: Callable[[Any], str] | None = None  # how a bad value is shown (default: repr)
    doc: str = ""


Schema = dict  # name -> Field | Schema


def _coerce(field: Field, value: Any) -> tuple[Any, str | None]:
    """Return (value, None) or (None, expected-text)."""
    kind = field.kind
    try:
        if kind == "any":
            return value, None
        if kind == "str":
            if not isinstance(value, str):
                return None, "a string"
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return None, "an integer"
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None, "a number"
            value = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                return None, "true or false"
        elif kind == "duration":
            value = parse_duration(value)
        elif kind == "size":
            value = parse_size(value)
        elif kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return None, "a list of strings"
        elif kind == "map[str,str]":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                return None, "a mapping of strings to strings"
        else:  # pragma: no cover - a schema bug, not user input
            raise AssertionError(f"unknown field kind {kind}")
    except ValueError:
        return None, {"duration": "a duration such as 5s, 10m or 2h",
                      "size": "a size such as 10MB, 64KiB or a number of bytes"}[kind]
    if field.choices and value not in field.choices:
        return None, "one of " + ", ".join(str(c) for c in field.choices)
    if field.minimum is not None and value < field.minimum:
        return None, f"a value >= {field.minimum:g}"
    if field.check is not None:
        rule = field.check(value)
        if rule:
            return None, rule
    return value, None


def validate(schema: Schema, data: Any, path: str, problems: list[ConfigProblem],
             handled_elsewhere: tuple[str, ...] = ()) -> dict:
    """Check `data` against `schema`; return it with defaults filled in.

    Keys in `handled_elsewhere` are known but checked by the caller.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(ConfigProblem(path or "(top level)", "a mapping", _describe(data)))
        return {}
    result: dict[str, Any] = {}
    for key in data:
        if key not in schema and key not in handled_elsewhere:
            known = ", ".join(sorted([*schema, *handled_elsewhere]))
            problems.append(ConfigProblem(_join(path, str(key)), f"one of the known keys ({known})",
                                          "an unknown key"))
    for key, rule in schema.items():
        key_path = _join(path, key)
        if isinstance(rule, dict):
            result[key] = validate(rule, data.get(key), key_path, problems)
            continue
        if key not in data or data[key] is None:
            if rule.default is REQUIRED:
                problems.append(ConfigProblem(key_path, f"a value ({rule.kind})", "nothing"))
            else:
                result[key] = rule.default
            continue
        value, expected = _coerce(rule, data[key])
        if expected:
            shown = ("a hidden value" if rule.secret
                     else _describe(rule.shown(data[key]) if rule.shown else data[key]))
            problems.append(ConfigProblem(key_path, expected, shown))
        else:
            result[key] = value
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
