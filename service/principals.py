"""Who a call is for: REST roles and REST user names, shared by hypervisord and the bridge.

The bridge authenticates REST users (tokens) and names the user and role on every
call it makes; hypervisord checks both with these same rules (dbus/dispatch.py) and
lets polkit decide for Unix callers (dbus/polkit.py).
"""
from __future__ import annotations

import re

ROLES = ("viewer", "operator", "admin")  # each may do what the ones before it may
REST_NAME_RULE = "1-128 printable characters"
_REST_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


def role_at_least(role: str, needed: str) -> bool:
    """True when `role` is a known role ranking at or above `needed`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def is_rest_name(name: object) -> bool:
    return isinstance(name, str) and _REST_NAME_RE.fullmatch(name) is not None
