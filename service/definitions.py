"""Checking the JSON objects users send (job definitions, schedules, webhooks, ...).

One rule set, so every kind of input refuses the same things with the same words: an
error names the field (with its path, e.g. `retention.count`) and the rule.
"""
from __future__ import annotations

from typing import Any, Iterable

from .errors import InvalidArgument


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
