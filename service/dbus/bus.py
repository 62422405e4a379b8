"""Connecting to a bus, with dbus-fast's writer made safe against full sockets.

dbus-fast 5.2.0 sends with a non-blocking socket and treats EAGAIN from `send()` as a
fatal error: a burst of signals that fills the socket buffer drops the connection
(the same bug as dbus-next issue #153). Its writer already copes with partial
writes by waiting for the socket to become writable, so a socket whose `send`
reports "0 bytes written" instead of raising EAGAIN makes it wait correctly.
"""
from __future__ import annotations

import os
import socket

from dbus_fast import BusType, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class EagainTolerantSocket:
    """A socket whose send/sendmsg return 0 instead of raising BlockingIOError."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers, ancdata=()) -> int:
        try:
            return self._sock.sendmsg(buffers, ancdata)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class ObjectManagerBus(MessageBus):
    """A bus that sends InterfacesAdded/Removed from the ObjectManager's own path.

    dbus-fast emits them from the exported object's path; the D-Bus specification and
    GDBusObjectManagerClient expect them from the ObjectManager object, so a client
    that follows the manager would never hear of new jobs.
    """

    manager_path = "/"

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected:
            return
        properties = {
            prop.name: Variant(prop.signature, prop.prop_getter(interface))
            for prop in ServiceInterface._get_properties(interface)
            if not prop.disabled and prop.access.readable()
        }
        self.send(Message.new_signal(self.manager_path, OBJECT_MANAGER, "InterfacesAdded",
                                     "oa{sa{sv}}", [path, {interface.name: properties}]))

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self.send(Message.new_signal(self.manager_path, OBJECT_MANAGER, "InterfacesRemoved",
                                     "oas", [path, removed_interfaces]))


def bus_kwargs(spec: str) -> dict:
    """`system`, `session` or a D-Bus address -> MessageBus keyword arguments."""
    if spec == "system":
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        return {"bus_address": address} if address else {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


async def connect(spec: str = "system", manager_path: str | None = None) -> MessageBus:
    """Connect; with manager_path, ObjectManager signals come from that path."""
    if manager_path:
        bus = ObjectManagerBus(**bus_kwargs(spec))
        bus.manager_path = manager_path
    else:
        bus = MessageBus(**bus_kwargs(spec))
    await bus.connect()
    writer = getattr(bus, "_writer", None)
    if writer is None or not hasattr(writer, "sock"):  # pragma: no cover - pinned version
        raise RuntimeError("unexpected dbus-fast internals: cannot protect the bus writer")
    writer.sock = EagainTolerantSocket(writer.sock)
    return bus
