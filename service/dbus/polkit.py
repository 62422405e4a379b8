"""Authorisation of D-Bus callers with polkit, by the caller's unique bus name.

Like udisks (`udisks_daemon_util_check_authorization_sync`), the subject is the
caller's `system-bus-name`, so polkit itself resolves the process and user behind
it. Root (uid 0) is allowed without asking. Any failure to ask is a refusal.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import HyperSDKError

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


@dataclass(frozen=True)
class Caller:
    """Who sent the method call being handled."""

    bus_name: str
    uid: int
    interactive: bool = False


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
        if caller.uid == 0:
            return
        subject = ("system-bus-name", {"name": Variant("s", caller.bus_name)})
        flags = FLAG_ALLOW_USER_INTERACTION if caller.interactive else 0
        try:
            reply = await self._call(destination=POLKIT_NAME, path=POLKIT_PATH,
                                     interface=POLKIT_IFACE, member="CheckAuthorization",
                                     signature="(sa{sv})sa{ss}us",
                                     body=[subject, action, {}, flags, ""])
        except RuntimeError as exc:
            log.warning("polkit check of %s for %s failed: %s", action, caller.bus_name, exc)
            raise AccessDenied(f"not authorized for {action}: the polkit check failed ({exc})")
        is_authorized, is_challenge, _details = reply.body[0]
        if not is_authorized:
            hint = " (authentication is required)" if is_challenge else ""
            raise AccessDenied(f"not authorized for {action}{hint}")
