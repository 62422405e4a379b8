"""Typed accessors for untrusted D-Bus arguments (after cockpit's jsonutil): JSON text
and a{sv} options. Each refusal is an InvalidArgument naming the argument and the rule."""
from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidArgument


MAX_JSON_DEPTH = 32


def parse_json(text: str, field: str, expect: type = dict) -> Any:
    """Parse a JSON argument; errors name the argument and the rule (the position of a
    syntax error, a number too long to read, nesting deeper than MAX_JSON_DEPTH)."""
    if text.strip() == "" and expect is dict:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"malformed JSON: {exc.msg} at line {exc.lineno} "
                                     f"column {exc.colno}") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise InvalidArgument(field, f"unusable JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidArgument(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(value, expect):
        raise InvalidArgument(field, f"must be a JSON {'object' if expect is dict else 'value'}")
    return value


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (iteratively)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                pending.extend((child, level + 1) for child in children)
    return deepest


def option(options: dict, name: str, default: Any = None) -> Any:
    return options[name].value if name in options else default


MAX_JOBS_PAGE = 1000
MAX_LOG_PAGE = 1000  # lines of at most engine.MAX_LOG_MESSAGE (4096) each: < 16 MiB
# Job records carry definitions and results of any size: a page of them ends early rather
# than pass this many bytes (a quarter of the system bus's 32 MiB message limit)
MAX_RECORDS_BYTES = 8 * 1024 * 1024


def text_option(options: dict, name: str, choices: tuple[str, ...] = ()) -> str:
    """A string option ("" when absent); InvalidArgument naming it when it is not a
    string or, given `choices`, not one of them."""
    if name not in options:
        return ""
    variant = options[name]
    if variant.signature != "s":
        raise InvalidArgument(f"options.{name}", f"a string (got D-Bus type "
                                                 f"{variant.signature})")
    if choices and variant.value not in choices:
        raise InvalidArgument(f"options.{name}", "one of " + ", ".join(choices))
    return variant.value


def page_option(options: dict, name: str, default: int, maximum: int) -> int:
    """An unsigned paging option ("limit", "offset"); InvalidArgument naming it when it is
    not an integer from 0 to `maximum`, so no reply can outgrow the bus's message limit."""
    if name not in options:
        return default
    variant = options[name]
    if variant.signature not in ("u", "t", "i", "x", "q", "n", "y"):
        raise InvalidArgument(f"options.{name}", f"an integer (got D-Bus type "
                                                 f"{variant.signature})")
    if not 0 <= variant.value <= maximum:
        raise InvalidArgument(f"options.{name}", f"an integer from 0 to {maximum}")
    return int(variant.value)
