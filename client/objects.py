"""The connection to hypervisord and a mirror of its objects, kept in arrival order.

The mirror is derived state, never a second source of truth: one ObjectManager
GetManagedObjects call fills it and the InterfacesAdded/Removed and PropertiesChanged
signals keep it current, so reads never cross the bus. It is rebuilt whenever
hypervisord (re)appears on the bus (NameOwnerChanged) and emptied when it leaves or
the bus connection drops; then `healthy` is False and `reason` says why. `run()`
reconnects with backoff until `close()`.

Ordering: the GetManagedObjects reply is applied inside the bus message handler, in
the order messages arrive, so a signal sent after the snapshot is never overwritten by
it and one sent before it is already contained in it. (Applying the reply after the
`await` lets the signals read in the same batch run first, and the older snapshot then
overwrites them.)

What listeners last heard is kept over an outage: the first snapshot after it is
compared with it, and every difference is told as the signals would have told it
(added, changed, completed, removed), so a listener that saw a job running before
hypervisord was killed hears that the restarted one failed it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dbus_fast import Message, MessageType, unpack_variants
from dbus_fast.aio import MessageBus

from .bus import connect
from .errors import ClientError, error_from_reply
from .names import (BUS_NAME, DBUS_IFACE, DBUS_NAME, DBUS_PATH, FINISHED, JOB_IFACE,
                    OBJECT_MANAGER_IFACE, PROPERTIES_IFACE, ROOT_PATH)

log = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0
BACKOFF_START = 0.5
BACKOFF_MAX = 10.0

Objects = dict[str, dict[str, dict[str, Any]]]
Event = TypeVar("Event")


@dataclass(frozen=True)
class ObjectEvent:
    """What listeners hear.

    type: added | changed | removed | log | completed | health. `changed` holds the
    changed properties; `args` the LogLine (id, time_usec, level, message) or Completed
    (success, message) signal's arguments.
    """

    type: str
    path: str = ""
    interface: str = ""
    changed: dict | None = None
    args: tuple = ()


class Listeners(Generic[Event]):
    """Functions called with every event; a listener that raises does not stop the others."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call `listener` for every event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self.unsubscribe(listener)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("listener failed on %r", event)


def _match_rules() -> list[str]:
    return [
        f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',"
        f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
        f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'",
    ]


class ServiceObjects:
    """hypervisord seen from a client: `await connect()` once, or `run()` to stay up."""

    def __init__(self, bus_spec: str = "system") -> None:
        self.bus_spec = bus_spec
        self.objects: Objects = {}
        self.healthy = False
        self.reason = "not connected to the bus yet"
        self._before_outage: Objects = {}  # what listeners last heard, while unhealthy
        self._bus: MessageBus | None = None
        self._owner = ""
        self._snapshot_serial = 0  # the pending GetManagedObjects call, if any
        self._listeners: Listeners[ObjectEvent] = Listeners()
        self.subscribe = self._listeners.subscribe
        self.unsubscribe = self._listeners.unsubscribe
        self._emit = self._listeners.emit
        self._reload_task: asyncio.Task | None = None
        self._run_task: asyncio.Task | None = None
        self._closing = False
        self._settled = asyncio.Event()  # the first snapshot, or knowing there is none

    # -- reads -------------------------------------------------------------------------
    def get(self, path: str, interface: str) -> dict[str, Any] | None:
        return self.objects.get(path, {}).get(interface)

    def under(self, prefix: str) -> Objects:
        """Objects whose path is directly below `prefix`."""
        start = prefix.rstrip("/") + "/"
        return {path: ifaces for path, ifaces in self.objects.items()
                if path.startswith(start) and "/" not in path[len(start):]}

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    # -- lifecycle ---------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, follow the name's owner and load the mirror; ClientError if the bus
        is unreachable or refuses us. A service that is not running is not an error:
        the mirror is unhealthy and fills in when the service appears."""
        try:
            bus = await connect(self.bus_spec)
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot connect to the {self.bus_spec} bus: {exc}",
                              "NoConnection") from None
        self._bus = bus
        try:
            bus.add_message_handler(self._on_message)
            for rule in _match_rules():
                await self._bus_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "AddMatch", "s", [rule])
            await self._follow_owner()
        except ClientError:
            self._bus = None  # half set up: `run()` must start over, not wait on it
            bus.disconnect()
            raise

    async def run(self) -> None:
        """Stay connected until `close()`: reconnect with backoff whenever the bus drops."""
        delay = BACKOFF_START
        while not self._closing:
            reason = "the connection to the bus was lost"
            try:
                if not self.connected:
                    await self.connect()
                delay = BACKOFF_START
                await self._bus.wait_for_disconnect()
            except ClientError as exc:
                reason = exc.message
            except Exception as exc:  # a dropped connection surfaces in many shapes
                log.debug("bus connection lost: %r", exc)
            if self._closing:
                break
            self._bus, self._owner = None, ""
            self._set_unhealthy(reason)
            self._settled.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def start(self, wait: float = 5.0) -> None:
        """`run()` in the background; wait a little for the first snapshot."""
        self._run_task = asyncio.create_task(self.run(), name="hypervisord-objects")
        try:
            await asyncio.wait_for(self._settled.wait(), wait)
        except asyncio.TimeoutError:
            log.warning("hypervisord not reachable yet: %s", self.reason)

    def close(self) -> None:
        self._closing = True
        for task in (self._reload_task, self._run_task):
            if task is not None:
                task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def stop(self) -> None:
        """close() and wait for the background tasks to end."""
        tasks = [task for task in (self._reload_task, self._run_task) if task is not None]
        self.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_owner(self) -> None:
        try:
            (owner,) = await self._bus_call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetNameOwner",
                                            "s", [BUS_NAME])
        except ClientError as exc:
            if exc.name != "ServiceUnknown":
                raise
            self._set_unhealthy(f"hypervisord is not on the bus ({BUS_NAME} has no owner)")
            self._settled.set()
            return
        await self.reload(owner)

    async def reload(self, owner: str = "") -> None:
        """Replace the mirror with the service's current objects (or mark it unhealthy).

        The reply is applied by the message handler, in arrival order, before this call
        returns. A refusal (AccessDenied) is raised after the mirror says why.
        """
        if owner:
            self._owner = owner
        serial = self._bus.next_serial() if self._bus is not None else 0
        self._snapshot_serial = serial
        try:
            await self._bus_call(BUS_NAME, ROOT_PATH, OBJECT_MANAGER_IFACE,
                                 "GetManagedObjects", "", [], serial=serial)
        except ClientError as exc:
            reason = f"hypervisord did not list its objects: {exc.message}"
            self._set_unhealthy(reason)
            if not exc.unavailable:
                raise ClientError(reason, exc.name, exc.dbus_error, exc.text) from None
        finally:
            if self._snapshot_serial == serial:  # not applied (an error); not a newer call's
                self._snapshot_serial = 0
            self._settled.set()

    def _set_unhealthy(self, reason: str) -> None:
        was = self.healthy
        self.healthy = False
        self.reason = reason
        if self.objects:
            self._before_outage = self.objects
        self.objects = {}
        if was:
            log.warning("hypervisord unavailable: %s", reason)
            self._emit(ObjectEvent("health"))

    def _schedule_reload(self, owner: str) -> None:
        """hypervisord (re)appeared: reload, retrying with backoff while it starts up."""
        self._owner = owner
        self._set_unhealthy("hypervisord restarted; reading its objects again")
        if self._reload_task and not self._reload_task.done():
            return
        self._reload_task = asyncio.get_running_loop().create_task(
            self._reload_with_backoff())

    async def _reload_with_backoff(self) -> None:
        delay = BACKOFF_START
        while not self._closing and self.connected and self._owner:
            try:
                await self.reload()
                if self.healthy:
                    return
            except ClientError as exc:
                log.debug("reload failed: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    # -- the message handler (runs in arrival order) ------------------------------------
    def _on_message(self, msg: Message) -> None:
        try:
            if msg.message_type == MessageType.SIGNAL:
                self._on_signal(msg)
            elif (msg.message_type == MessageType.METHOD_RETURN and self._snapshot_serial
                  and msg.reply_serial == self._snapshot_serial):
                self._snapshot_serial = 0
                self._apply_snapshot(msg.body[0])
        except Exception:
            log.exception("could not handle %s.%s from %s", msg.interface, msg.member, msg.path)

    def _apply_snapshot(self, managed: dict) -> None:
        self.objects = unpack_variants(managed)
        self.healthy = True
        self.reason = ""
        log.info("mirrored %d objects of hypervisord", len(self.objects))
        self._emit(ObjectEvent("health"))
        before, self._before_outage = self._before_outage, {}
        self._emit_differences(before)

    def _emit_differences(self, before: Objects) -> None:
        """Tell listeners what changed while hypervisord or the bus was away."""
        if not before:
            return  # the first snapshot: nothing was told before it
        for path, ifaces in self.objects.items():
            for interface, props in ifaces.items():
                old = before.get(path, {}).get(interface)
                if old is None:
                    self._emit(ObjectEvent("added", path, interface))
                    continue
                changed = {name: value for name, value in props.items()
                           if old.get(name) != value}
                if changed:
                    self._emit(ObjectEvent("changed", path, interface, changed))
                if interface == JOB_IFACE and changed.get("Status") in FINISHED:
                    self._emit(ObjectEvent("completed", path, interface,
                                           args=(props["Status"] == "completed",
                                                 props.get("Error", ""))))
        for path, ifaces in before.items():
            for interface in ifaces:
                if interface not in self.objects.get(path, {}):
                    self._emit(ObjectEvent("removed", path, interface))

    def _on_signal(self, msg: Message) -> None:
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME:
            name, _old, new = msg.body
            if name != BUS_NAME:
                return
            if new:
                self._schedule_reload(new)
            else:
                self._owner = ""
                self._set_unhealthy(f"hypervisord left the bus ({BUS_NAME} has no owner)")
        elif (self.healthy and msg.sender == self._owner
              and (msg.path or "").startswith(ROOT_PATH)):
            # While a snapshot is pending, what a signal says is in the snapshot (sent
            # before its reply): the differences tell it once, after the snapshot.
            self._on_service_signal(msg)

    def _on_service_signal(self, msg: Message) -> None:
        member, body, path = msg.member, msg.body, msg.path
        if member == "PropertiesChanged" and msg.interface == PROPERTIES_IFACE:
            interface, changed = body[0], unpack_variants(body[1])
            target = self.objects.get(path, {}).get(interface)
            if target is not None:
                target.update(changed)
                self._emit(ObjectEvent("changed", path, interface, changed))
        elif member == "InterfacesAdded" and msg.interface == OBJECT_MANAGER_IFACE:
            added_path, added = body[0], unpack_variants(body[1])
            ifaces = self.objects.setdefault(added_path, {})
            for interface, props in added.items():
                ifaces[interface] = props
                self._emit(ObjectEvent("added", added_path, interface))
        elif member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER_IFACE:
            removed_path, removed = body
            ifaces = self.objects.get(removed_path, {})
            for interface in removed:
                if ifaces.pop(interface, None) is not None:
                    self._emit(ObjectEvent("removed", removed_path, interface))
            if not ifaces:
                self.objects.pop(removed_path, None)
        elif member == "LogLine" and msg.interface == JOB_IFACE:
            self._emit(ObjectEvent("log", path, JOB_IFACE, args=tuple(body)))
        elif member == "Completed" and msg.interface == JOB_IFACE:
            self._emit(ObjectEvent("completed", path, JOB_IFACE, args=tuple(body)))

    # -- calls -------------------------------------------------------------------------
    async def call(self, path: str, interface: str, member: str, signature: str,
                   body: list, timeout: float = CALL_TIMEOUT) -> list:
        """Call a method of hypervisord; ClientError for an error reply or no answer."""
        return await self._bus_call(BUS_NAME, path, interface, member, signature, body,
                                    timeout)

    async def _bus_call(self, destination: str, path: str, interface: str, member: str,
                        signature: str, body: list, timeout: float = CALL_TIMEOUT,
                        serial: int = 0) -> list:
        """`serial`: one from the bus's next_serial(), to recognise the reply (0: any)."""
        if self._bus is None:
            raise ClientError("not connected to the bus", "NoConnection")
        message = Message(destination=destination, path=path, interface=interface,
                          member=member, signature=signature, body=body, serial=serial)
        try:
            reply = await asyncio.wait_for(self._bus.call(message), timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"hypervisord did not answer {member} within {timeout:.0f} s",
                              "Timeout") from None
        except Exception as exc:  # a dropped connection, whatever dbus-fast calls it
            log.warning("D-Bus call %s failed: %r", member, exc)
            raise ClientError(f"the bus connection failed ({type(exc).__name__})",
                              "NoConnection") from None
        if reply is None:
            raise ClientError("the bus connection was lost", "NoConnection")
        if reply.message_type == MessageType.ERROR:
            raise error_from_reply(reply)
        return reply.body
