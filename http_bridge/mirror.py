"""A read-only mirror of hypervisord's objects, and the bridge's one D-Bus connection.

The mirror is derived state, never a second source of truth: it is filled by one
ObjectManager.GetManagedObjects call and kept current by the InterfacesAdded/Removed
and PropertiesChanged signals, so REST reads never cross the bus. It is rebuilt
whenever hypervisord (re)appears on the bus and emptied when it leaves
(NameOwnerChanged); then `healthy` is False and `reason` says why.

What listeners last heard is kept over an outage: the first snapshot after it is
compared with it, and every difference is told as the signals would have told it
(added, changed, completed, removed), so a WebSocket client that saw a job running
before hypervisord was killed hears that the restarted one failed it.

Ordering: the GetManagedObjects reply is applied inside the bus message handler, in
the order messages arrive, so a signal sent after the snapshot is never overwritten
by it and one sent before it is already contained in it.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hypersdk.service.dbus.bus import connect
from hypersdk.service.dbus.paths import BUS_NAME, ROOT_PATH

from .auth import Identity
from .errors import ACCESS_DENIED, from_dbus, invalid, unavailable
from .views import FINISHED

log = logging.getLogger(__name__)

DBUS_NAME, DBUS_PATH, DBUS_IFACE = "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
JOB_IFACE = "org.hypersdk.HyperSDK1.Job"
CALL_TIMEOUT = 120.0
RECONNECT_DELAY = 1.0


@dataclass(frozen=True)
class MirrorEvent:
    """What listeners (WebSocket hub, log followers) hear.

    type: added | removed | changed | log | completed | health
    """

    type: str
    path: str = ""
    interface: str = ""
    changed: dict | None = None
    args: tuple = ()


Listener = Callable[[MirrorEvent], None]
Objects = dict[str, dict[str, dict[str, Any]]]


def _plain(props: dict[str, Variant]) -> dict[str, Any]:
    return {name: variant.value for name, variant in props.items()}


def check_dbus_string(field: str, value: str) -> str:
    """D-Bus strings are valid UTF-8 without NUL; refuse others before they reach the bus."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(field, "must be valid Unicode text (no lone surrogates)") from None
    if "\x00" in value:
        raise invalid(field, "must not contain NUL characters")
    return value


class ServiceMirror:
    def __init__(self, bus_spec: str = "system") -> None:
        self.bus_spec = bus_spec
        self.objects: Objects = {}
        self._before_outage: Objects = {}  # what listeners last heard, while unhealthy
        self.healthy = False
        self.reason = "not connected to the system bus yet"
        self._bus: MessageBus | None = None
        self._owner = ""
        self._snapshot_serial = 0
        self._listeners: list[Listener] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    # -- listeners ---------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: MirrorEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not stop the others
                log.exception("mirror listener failed on %s", event.type)

    # -- reads -------------------------------------------------------------------------
    def get(self, path: str, interface: str) -> dict[str, Any] | None:
        return self.objects.get(path, {}).get(interface)

    def under(self, prefix: str) -> Objects:
        """Objects whose path is directly below `prefix`."""
        start = prefix.rstrip("/") + "/"
        return {path: ifaces for path, ifaces in self.objects.items()
                if path.startswith(start) and "/" not in path[len(start):]}

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, wait: float = 5.0) -> None:
        """Connect in the background; wait a little for the first snapshot."""
        self._task = asyncio.create_task(self._run(), name="mirror")
        try:
            await asyncio.wait_for(self._ready.wait(), wait)
        except asyncio.TimeoutError:
            log.warning("hypervisord not reachable yet: %s", self.reason)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._bus:
            self._bus.disconnect()

    async def _run(self) -> None:
        while True:
            try:
                self._bus = await connect(self.bus_spec)
                self._bus.add_message_handler(self._on_message)
                await self._subscribe_signals()
                await self._follow_owner()
                await self._bus.wait_for_disconnect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus itself is gone or refused us
                log.warning("D-Bus connection problem: %s", exc)
            self._set_unhealthy("the bridge lost its connection to the system bus")
            self._ready.set()
            await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe_signals(self) -> None:
        rules = [
            f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
            f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'",
        ]
        for rule in rules:
            await self._bus_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "AddMatch", "s", [rule])

    async def _follow_owner(self) -> None:
        reply = await self._bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH,
                                             interface=DBUS_IFACE, member="GetNameOwner",
                                             signature="s", body=[BUS_NAME]))
        if reply.message_type == MessageType.ERROR:
            self._set_unhealthy("hypervisord is not on the bus "
                                f"({BUS_NAME} has no owner)")
            self._ready.set()
            return
        await self._rebuild(reply.body[0])

    async def _rebuild(self, owner: str) -> None:
        self._owner = owner
        serial = self._bus.next_serial()
        self._snapshot_serial = serial
        reply = await self._bus.call(Message(destination=BUS_NAME, path=ROOT_PATH,
                                             interface=OBJECT_MANAGER,
                                             member="GetManagedObjects", serial=serial))
        if reply.message_type == MessageType.ERROR:
            hint = (" (only members of group hypersdk may read it; is the bridge's user one?)"
                    if reply.error_name == ACCESS_DENIED else "")
            self._set_unhealthy(f"hypervisord did not list its objects: {reply.error_name}"
                                + hint)
        self._ready.set()

    def _set_unhealthy(self, reason: str) -> None:
        was = self.healthy
        self.healthy = False
        self.reason = reason
        if self.objects:
            self._before_outage = self.objects
        self.objects = {}
        self._owner = ""
        if was:
            log.warning("hypervisord unavailable: %s", reason)
            self._emit(MirrorEvent("health"))

    # -- the message handler (runs in arrival order) ------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_RETURN:
            if msg.reply_serial == self._snapshot_serial and self._snapshot_serial:
                self._apply_snapshot(msg.body[0])
            return None
        if msg.message_type != MessageType.SIGNAL:
            return None
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME:
            self._on_owner_changed(*msg.body)
        elif msg.sender == self._owner and (msg.path or "").startswith(ROOT_PATH):
            self._on_service_signal(msg)
        return None

    def _apply_snapshot(self, managed: dict) -> None:
        self._snapshot_serial = 0
        self.objects = {path: {iface: _plain(props) for iface, props in ifaces.items()}
                        for path, ifaces in managed.items()}
        self.healthy = True
        self.reason = ""
        log.info("mirrored %d objects of hypervisord", len(self.objects))
        self._emit(MirrorEvent("health"))
        before, self._before_outage = self._before_outage, {}
        self._emit_differences(before)

    def _emit_differences(self, before: Objects) -> None:
        """Tell listeners what changed while hypervisord or the bus was away."""
        if not before:
            return
        for path, ifaces in self.objects.items():
            for interface, props in ifaces.items():
                old = before.get(path, {}).get(interface)
                if old is None:
                    self._emit(MirrorEvent("added", path, interface))
                    continue
                changed = {name: value for name, value in props.items()
                           if old.get(name) != value}
                if changed:
                    self._emit(MirrorEvent("changed", path, interface, changed))
                if interface == JOB_IFACE and changed.get("Status") in FINISHED:
                    self._emit(MirrorEvent("completed", path, interface,
                                           args=(props["Status"] == "completed",
                                                 props.get("Error", ""))))
        for path, ifaces in before.items():
            for interface in ifaces:
                if interface not in self.objects.get(path, {}):
                    self._emit(MirrorEvent("removed", path, interface))

    def _on_owner_changed(self, name: str, old: str, new: str) -> None:
        if name != BUS_NAME:
            return
        if new:
            self._set_unhealthy("hypervisord restarted; reading its objects again")
            asyncio.get_running_loop().create_task(self._rebuild(new))
        else:
            self._set_unhealthy(f"hypervisord left the bus ({BUS_NAME} has no owner)")

    def _on_service_signal(self, msg: Message) -> None:
        member, body = msg.member, msg.body
        if member == "PropertiesChanged" and msg.interface == PROPERTIES:
            interface, changed = body[0], _plain(body[1])
            target = self.objects.get(msg.path, {}).get(interface)
            if target is None:
                return
            target.update(changed)
            self._emit(MirrorEvent("changed", msg.path, interface, changed))
        elif member == "InterfacesAdded" and msg.interface == OBJECT_MANAGER:
            path, added = body
            ifaces = self.objects.setdefault(path, {})
            for interface, props in added.items():
                ifaces[interface] = _plain(props)
                self._emit(MirrorEvent("added", path, interface))
        elif member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER:
            path, removed = body
            ifaces = self.objects.get(path, {})
            for interface in removed:
                ifaces.pop(interface, None)
                self._emit(MirrorEvent("removed", path, interface))
            if not ifaces:
                self.objects.pop(path, None)
        elif member == "LogLine" and msg.interface == JOB_IFACE:
            self._emit(MirrorEvent("log", msg.path, JOB_IFACE, args=tuple(body)))
        elif member == "Completed" and msg.interface == JOB_IFACE:
            self._emit(MirrorEvent("completed", msg.path, JOB_IFACE, args=tuple(body)))

    # -- calls -------------------------------------------------------------------------
    async def call(self, path: str, interface: str, member: str, signature: str,
                   body: list, *, principal: Identity) -> list:
        """Call hypervisord on behalf of `principal`; D-Bus errors become ApiError.

        Every method of hypervisord ends with `options a{sv}`: the REST identity goes
        there as `requested_by` and `requested_role`, so hypervisord (which trusts them
        from the bridge's uid only) records and authorises the end user, not the bridge.
        """
        if not self.healthy or self._bus is None:
            raise unavailable(self.reason or "hypervisord is not available")
        *arguments, options = body
        options = {**options, "requested_by": Variant("s", principal.name),
                   "requested_role": Variant("s", principal.role)}
        return await self._bus_call(BUS_NAME, path, interface, member, signature,
                                    [*arguments, options])

    async def _bus_call(self, destination: str, path: str, interface: str, member: str,
                        signature: str, body: list) -> list:
        message = Message(destination=destination, path=path, interface=interface,
                          member=member, signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(self._bus.call(message), CALL_TIMEOUT)
        except asyncio.TimeoutError:
            raise unavailable(f"hypervisord did not answer {member} within "
                              f"{CALL_TIMEOUT:.0f} s") from None
        except Exception as exc:  # a dropped connection, whatever dbus-fast calls it
            log.warning("D-Bus call %s failed: %r", member, exc)
            raise unavailable(f"the D-Bus connection failed ({type(exc).__name__})") from None
        if reply.message_type == MessageType.ERROR:
            raise from_dbus(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return reply.body

