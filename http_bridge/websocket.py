"""`/websocket`: job updates pushed to every client, each with its own bounded queue.

The hub turns each mirror event into one JSON text and one WebSocket frame (server
frames are unmasked, so the same bytes serve every client; compression is off).
For each client the frame goes into the client's queue, and the queue is flushed
straight into the client's transport while that transport's write buffer is below
HIGH_WATER. A client that does not read fills its own buffer, then its own queue;
it never makes the hub wait, so it never slows other clients or the service. One
drain task retries the clients with a backlog every DRAIN_INTERVAL.

A queue holds at most `max_items` frames: a newer progress update of a job replaces
the one still waiting, and when the queue is full the oldest progress update is
dropped first. Status changes, created and completed events are never dropped; a
client so far behind that its queue is full of them is disconnected, which keeps
memory bounded.

Client messages: `{"subscribe": ["job-..", ...]}` limits the updates to those jobs
(an empty list: all jobs again); `{"type": "ping"}` is answered `{"type": "pong"}`.
WebSocket-level ping/pong runs as the heartbeat.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import weakref
from collections import OrderedDict
from itertools import count
from typing import Callable

from aiohttp import WSCloseCode, WSMsgType, web

from hypersdk.client.names import JOB_IFACE
from hypersdk.client.objects import ObjectEvent

from .auth import Identity
from .mirror import ServiceMirror
from .views import update_json

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20.0
MAX_QUEUED = 256
HIGH_WATER = 256 * 1024
DRAIN_INTERVAL = 0.02


def text_frame(body: dict) -> bytes:
    """One unmasked, uncompressed, final WebSocket text frame (RFC 6455 5.2)."""
    payload = json.dumps(body).encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class ClientQueue:
    """Pending frames of one client; see the module docstring for the dropping rule."""

    def __init__(self, max_items: int = MAX_QUEUED) -> None:
        self.max_items = max_items
        self.dropped = 0
        self.overflowed = False
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._seq = count()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: bytes, progress_of: str | None = None) -> bool:
        """Queue `frame`; progress updates name their job. False once overflowed."""
        if self.overflowed:
            return False
        if progress_of is not None:
            key: object = ("progress", progress_of)
            if self._items.pop(key, None) is not None:
                self.dropped += 1
        else:
            key = next(self._seq)
        self._items[key] = frame
        while len(self._items) > self.max_items:
            if not self._drop_oldest_progress():
                self.overflowed = True
                self._items.clear()
                return False
        return True

    def _drop_oldest_progress(self) -> bool:
        for key in self._items:
            if isinstance(key, tuple):
                del self._items[key]
                self.dropped += 1
                return True
        return False

    def pop(self) -> bytes:
        return self._items.popitem(last=False)[1]


class Client:
    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport,
                 identity: Identity, max_queued: int) -> None:
        self.ws = ws
        self.transport = transport
        self.identity = identity
        self.queue = ClientQueue(max_queued)
        self.jobs: set[str] | None = None  # None: every job

    def wants(self, job_id: str) -> bool:
        return self.jobs is None or job_id in self.jobs

    def flush(self) -> None:
        """Write queued frames while the transport takes them without piling up."""
        transport = self.transport
        while self.queue and not transport.is_closing() \
                and transport.get_write_buffer_size() < HIGH_WATER:
            transport.write(self.queue.pop())


class WebSocketHub:
    def __init__(self, mirror: ServiceMirror, max_queued: int = MAX_QUEUED) -> None:
        self.mirror = mirror
        self.max_queued = max_queued
        self.clients: set[Client] = set()
        self.dropped_total = 0
        self.disconnected_slow = 0
        self._backlog: set[Client] = set()
        self._drainer: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        mirror.subscribe(self._on_event)

    def close(self) -> None:
        self.mirror.unsubscribe(self._on_event)
        if self._drainer:
            self._drainer.cancel()

    # -- from the mirror ---------------------------------------------------------------
    def _on_event(self, event: ObjectEvent) -> None:
        if event.interface != JOB_IFACE or not self.clients:
            return
        props = self.mirror.get(event.path, JOB_IFACE)
        if props is None:
            return
        if event.type == "added":
            self.broadcast(props, "job.created", droppable=False)
        elif event.type == "completed":
            self.broadcast(props, "job.completed", droppable=False)
        elif event.type == "changed":
            status_change = "Status" in (event.changed or {})
            self.broadcast(props, "job.status" if status_change else "job.progress",
                           droppable=not status_change)

    def broadcast(self, props: dict, event: str, droppable: bool) -> None:
        job_id = props.get("Id", "")
        frame = text_frame(update_json(props, event))
        for client in list(self.clients):
            if client.wants(job_id):
                self.send(client, frame, job_id if droppable else None)

    def send(self, client: Client, frame: bytes, progress_of: str | None = None) -> None:
        before = client.queue.dropped
        accepted = client.queue.put(frame, progress_of)
        self.dropped_total += client.queue.dropped - before
        if not accepted:
            self._disconnect_slow(client)
            return
        client.flush()
        if client.queue:
            self._backlog.add(client)
            if self._drainer is None or self._drainer.done():
                self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._backlog:
            await asyncio.sleep(DRAIN_INTERVAL)
            for client in list(self._backlog):
                if client.transport.is_closing():
                    self._backlog.discard(client)
                    continue
                client.flush()
                if not client.queue:
                    self._backlog.discard(client)

    def _disconnect_slow(self, client: Client) -> None:
        self._forget(client)
        self.disconnected_slow += 1
        log.warning("websocket client %s fell %d messages behind; disconnected",
                    client.identity.name, client.queue.max_items)
        client.transport.abort()

    def _forget(self, client: Client) -> None:
        self.clients.discard(client)
        self._backlog.discard(client)

    def revoke(self, still_valid: Callable[[Identity], bool]) -> int:
        """Close the clients whose token no longer grants what it did (SIGHUP); returns
        how many. Their close frame says why (1008, policy violation)."""
        revoked = [c for c in self.clients if not still_valid(c.identity)]
        for client in revoked:
            self._forget(client)
            task = asyncio.get_running_loop().create_task(client.ws.close(
                code=WSCloseCode.POLICY_VIOLATION, message=b"token revoked"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return len(revoked)

    # -- one client --------------------------------------------------------------------
    async def handle(self, request: web.Request, identity: Identity) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=64 * 1024,
                                   compress=False)
        await ws.prepare(request)
        if request.transport is None:  # the client left during the handshake
            return ws
        client = Client(ws, request.transport, identity, self.max_queued)
        self.clients.add(client)
        request.app[WEBSOCKETS].add(ws)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_message(client, message.data)
        finally:
            self._forget(client)
            request.app[WEBSOCKETS].discard(ws)
        return ws

    def _on_client_message(self, client: Client, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            self._error(client, "message", "message: malformed JSON")
            return
        if isinstance(message, dict) and message.get("type") == "ping":
            self.send(client, text_frame({"type": "pong"}))
        elif isinstance(message, dict) and "subscribe" in message:
            self._subscribe(client, message["subscribe"])
        else:
            self._error(client, "message", 'message: expected {"subscribe": [job ids]} '
                                           'or {"type": "ping"}')

    def _subscribe(self, client: Client, jobs) -> None:
        if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
            self._error(client, "subscribe", "subscribe: expected a list of job ids")
            return
        client.jobs = set(jobs) or None
        self.send(client, text_frame({"type": "subscribed", "jobs": sorted(jobs)}))
        # the current state of each watched job, so a client never misses where it is
        for ifaces in list(self.mirror.objects.values()):
            props = ifaces.get(JOB_IFACE)
            if props and client.jobs and props.get("Id") in client.jobs:
                self.send(client, text_frame(update_json(props, "job.status")))

    def _error(self, client: Client, field: str, message: str) -> None:
        self.send(client, text_frame({"type": "error", "error": "InvalidArgument",
                                      "field": field, "message": message}))


WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)


async def close_all(app: web.Application) -> None:
    """on_shutdown: tell every WebSocket client the server is going away."""
    for ws in set(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
