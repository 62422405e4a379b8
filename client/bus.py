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

from dbus_fast import BusType
from dbus_fast.aio import MessageBus


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


def bus_kwargs(spec: str) -> dict:
    """`system`, `session` or a D-Bus address -> MessageBus keyword arguments."""
    if spec == "system":
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        return {"bus_address": address} if address else {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


async def connect_bus(bus: MessageBus) -> MessageBus:
    """Connect `bus` (made with bus_kwargs) and protect its writer."""
    await bus.connect()
    writer = getattr(bus, "_writer", None)
    if writer is None or not hasattr(writer, "sock"):  # pragma: no cover - pinned version
        raise RuntimeError("unexpected dbus-fast internals: cannot protect the bus writer")
    writer.sock = EagainTolerantSocket(writer.sock)
    return bus


async def connect(spec: str = "system") -> MessageBus:
    """A protected connection to the bus `spec` names."""
    return await connect_bus(MessageBus(**bus_kwargs(spec)))
