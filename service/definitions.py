"""Checking the JSON objects users send (job definitions, schedules, webhooks, ...).

One rule set, so every kind of input refuses the same things with the same words: an
error names the field (with its path, e.g. `retention.count`) and the rule.
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
            raise InvalidArgument(prefix + str(key),
                                  "unknown field (known: " + ", ".join(allowed) + ")")
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


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, "must be true or false")
    return value


def new_id(prefix: str) -> str:
    """The id of something a user creates: `schedule-1a2b3c4d5e6f`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
