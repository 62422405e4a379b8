"""Authorisation of D-Bus callers with polkit, by the caller's unique bus name.

Like udisks (`udisks_daemon_util_check_authorization_sync`), the subject is the
caller's `system-bus-name`, so polkit itself resolves the process and user behind
it. Root (uid 0) is allowed without asking. Any failure to ask is a refusal.

A call the REST bridge makes for one of its users carries that user (the
principal) and their REST role. The service itself refuses an action the role
does not reach (ROLE_NEEDED, even when the bridge runs as root), and polkit is asked
with the principal and role as details (`hypersdk.principal`, `hypersdk.role`), which
rules can read with `action.lookup()`: only hypervisord sets them, and only for
calls from the bridge's own user.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import HyperSDKError
from ..principals import role_at_least

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
FLAG_ALLOW_USER_INTERACTION = 1
UNKNOWN_UID = 0xFFFFFFFF


class AccessDenied(HyperSDKError):
    """Reported on D-Bus as org.freedesktop.DBus.Error.AccessDenied."""

    name = "AccessDenied"

    @property
    def dbus_name(self) -> str:
        return "org.freedesktop.DBus.Error.AccessDenied"


ACTION_PREFIX = "org.hypersdk.HyperSDK1."
# The least REST role for each action; anything not listed needs admin.
ROLE_NEEDED = {
    "view": "viewer",
    "export": "operator", "convert": "operator", "import": "operator", "cancel-job": "operator",
    "manage-schedules": "operator", "manage-backup-policies": "operator",
    "manage-plans": "operator",
    "manage-webhooks": "admin", "cancel-job-other-user": "admin", "manage-providers": "admin",
}


@dataclass(frozen=True)
class Caller:
    """Who sent the method call being handled: the connection, its Unix user, and the
    user it acts for (`principal`: "unix:<user>" for a direct caller, "rest:<token
    name>" for a REST user, whose REST `role` the bridge vouches for)."""

    bus_name: str
    uid: int
    interactive: bool = False
    principal: str = ""
    role: str = ""

    @property
    def is_rest(self) -> bool:
        return self.principal.startswith("rest:")


def role_allows(role: str, action: str) -> bool:
    needed = ROLE_NEEDED.get(action.removeprefix(ACTION_PREFIX), "admin")
    return role_at_least(role, needed)


class Authority:
    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    async def _call(self, **kwargs) -> Message:
        reply = await self._bus.call(Message(**kwargs))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply

    async def caller_uid(self, bus_name: str) -> int:
        try:
            reply = await self._call(destination="org.freedesktop.DBus",
                                     path="/org/freedesktop/DBus",
                                     interface="org.freedesktop.DBus",
                                     member="GetConnectionUnixUser", signature="s",
                                     body=[bus_name])
        except RuntimeError:
            return UNKNOWN_UID
        return int(reply.body[0])

    async def check(self, caller: Caller, action: str) -> None:
        """Return if `caller` may perform `action`; raise AccessDenied otherwise."""
        if caller.is_rest and not role_allows(caller.role, action):
            raise AccessDenied(f"not authorized for {action}: REST role {caller.role} of "
                               f"{caller.principal.removeprefix('rest:')!r} does not allow it")
        if caller.uid == 0:
            return
        subject = ("system-bus-name", {"name": Variant("s", caller.bus_name)})
        flags = FLAG_ALLOW_USER_INTERACTION if caller.interactive else 0
        details = ({"hypersdk.principal": caller.principal, "hypersdk.role": caller.role}
                   if caller.is_rest else {})
        try:
            reply = await self._call(destination=POLKIT_NAME, path=POLKIT_PATH,
                                     interface=POLKIT_IFACE, member="CheckAuthorization",
                                     signature="(sa{sv})sa{ss}us",
                                     body=[subject, action, details, flags, ""])
        except RuntimeError as exc:
            log.warning("polkit check of %s for %s failed: %s", action, caller.bus_name, exc)
            raise AccessDenied(f"not authorized for {action}: the polkit check failed ({exc})")
        is_authorized, is_challenge, _details = reply.body[0]
        if not is_authorized:
            hint = " (authentication is required)" if is_challenge else ""
            raise AccessDenied(f"not authorized for {action}{hint}")
