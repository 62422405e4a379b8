"""Checking the JSON objects users send (job definitions, schedules, webhooks, ...).

One rule set, so every kind of input refuses the same things with the same words: an
error names the field (with its path, e.g. `retention.count`) and the rule. `JsonObject`
reads one object with typed accessors (as cockpit's jsonutil does), so a validator says
what it wants instead of writing each isinstance check and its message again.
"""
from __future__ import annotations

import re
import uuid
from typing import Any, Iterable

from .errors import InvalidArgument

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def check_fields(definition: Any, allowed: Iterable[str], required: Iterable[str] = (),
                 prefix: str = "") -> dict:
    """A JSON object with only `allowed` keys and every `required` one (non-empty)."""
    allowed = tuple(allowed)
    if not isinstance(definition, dict):
        raise InvalidArgument(prefix.rstrip(".") or "definition", "must be a JSON object")
    for key in definition:
        if key not in allowed:
            raise InvalidArgument(prefix + str(key), "unknown field (known: "
                                  + (", ".join(allowed) or "none") + ")")
    for key in required:
        if definition.get(key) in (None, ""):
            raise InvalidArgument(prefix + key, "is required")
    return definition


def check_name(value: Any, field: str = "name") -> str:
    """The name of something a user creates (a schedule, a backup policy)."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidArgument(field, "1-128 letters, digits, spaces, '.', '_' or '-', "
                                     "starting with a letter or digit")
    return value


def new_id(prefix: str) -> str:
    """The id of something a user creates: `schedule-1a2b3c4d5e6f`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


REQUIRED: Any = object()  # an accessor's default: the field must be there


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if choices and value not in choices:
        raise InvalidArgument(field, "one of " + ", ".join(c for c in choices if c))


class JsonObject:
    """Typed reads of one untrusted JSON object whose fields are among `known`.

    Each accessor returns the field's value (or `default` when it is absent or null) and
    raises InvalidArgument naming the field when it has the wrong type, range or value.
    """

    def __init__(self, value: Any, known: Iterable[str], prefix: str = "") -> None:
        self.data = check_fields(value, known, (), prefix)
        self.prefix = prefix

    def _typed(self, key: str, default: Any, kind: type | tuple[type, ...], rule: str) -> Any:
        """The field's value if it is a `kind` (a bool is no integer), `default` when it is
        absent or null; InvalidArgument(field, rule) otherwise."""
        value = self.data.get(key)
        if value is None:
            if default is REQUIRED:
                raise InvalidArgument(self.prefix + key, "required")
            return default
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidArgument(self.prefix + key, rule)
        return value

    def text(self, key: str, default: Any = REQUIRED, choices: Iterable[str] = (),
             non_empty: bool = False) -> str:
        """A string; with `non_empty`, not "" or blanks; with `choices`, one of them."""
        rule = "a non-empty string" if non_empty else "a string"
        value = self._typed(key, default, str, rule)
        if non_empty and not value.strip():
            raise InvalidArgument(self.prefix + key, rule)
        _check_choice(self.prefix + key, value, tuple(choices))
        return value

    def number(self, key: str, default: Any = REQUIRED, above: float | None = None,
               unit: str = "") -> float:
        """An integer or a decimal number (of `unit`, for the message), > `above`."""
        rule = " ".join(filter(None, ("a number", unit and f"of {unit}",
                                      above is not None and f"> {above:g}")))
        value = self._typed(key, default, (int, float), rule)
        if self.data.get(key) is not None and above is not None and value <= above:
            raise InvalidArgument(self.prefix + key, rule)
        return float(value) if value is not None else value

    def texts(self, key: str, default: Any = REQUIRED, choices: Iterable[str] = (),
              non_empty: bool = False) -> list[str]:
        """A list of strings (each one of `choices`, when given); `key[i]` names a bad item."""
        choices = tuple(choices)
        rule = ("a non-empty list" if non_empty else "a list") + \
            (" of: " + ", ".join(choices) if choices else " of strings")
        values = self._typed(key, default, list, rule)
        if self.data.get(key) is None:
            return values
        if non_empty and not values:
            raise InvalidArgument(self.prefix + key, rule)
        for index, item in enumerate(values):
            if not isinstance(item, str):
                raise InvalidArgument(f"{self.prefix}{key}[{index}]", "a string")
            _check_choice(f"{self.prefix}{key}[{index}]", item, choices)
        return list(values)

    def text_map(self, key: str, default: Any = REQUIRED) -> dict[str, str]:
        """A JSON object whose values are strings; `key.name` names a bad value."""
        mapping = self.mapping(key, default)
        for name, value in (mapping or {}).items():
            if not isinstance(value, str):
                raise InvalidArgument(f"{self.prefix}{key}.{name}", "a string")
        return mapping

    def section(self, key: str, known: Iterable[str]) -> "JsonObject":
        """The JSON object at `key` (absent or null: an empty one), read the same way."""
        return JsonObject(self.data.get(key) if self.data.get(key) is not None else {},
                          known, f"{self.prefix}{key}.")

    def integer(self, key: str, default: Any = REQUIRED, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self._typed(key, default, int, "an integer")
        if self.data.get(key) is None:
            return value  # the default, as the caller chose it
        if minimum is not None and value < minimum:
            raise InvalidArgument(self.prefix + key, f"an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise InvalidArgument(self.prefix + key, f"an integer from {minimum} to {maximum}"
                                  if minimum is not None else f"an integer <= {maximum}")
        return value

    def flag(self, key: str, default: Any = REQUIRED) -> bool:
        return self._typed(key, default, bool, "true or false")

    def mapping(self, key: str, default: Any = REQUIRED) -> dict:
        return self._typed(key, default, dict, "must be a JSON object")
