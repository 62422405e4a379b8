"""`/websocket`: job updates pushed to every client, each with its own bounded queue.

The hub turns mirror events into JSON text once and offers it to every client's
queue; a writer task per client sends from that queue, so a slow or stalled client
only ever blocks its own writer. A queue holds at most `max_items` messages: a
newer progress update of a job replaces the one still waiting, and when the queue
is full the oldest progress update is dropped first. Status changes, created and
completed events are never dropped; a client so far behind that its queue is full
of them is disconnected (close code 1013), which keeps memory bounded.

Client messages: `{"subscribe": ["job-..", ...]}` limits the updates to those jobs
(an empty list: all jobs again); `{"type": "ping"}` is answered `{"type": "pong"}`.
WebSocket-level ping/pong runs as the heartbeat.
"""
from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import OrderedDict
from itertools import count

from aiohttp import WSCloseCode, WSMsgType, web

from .mirror import JOB_IFACE, MirrorEvent, ServiceMirror
from .views import update_json

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20.0
MAX_QUEUED = 256
CLOSE_TOO_SLOW = 1013  # "try again later"


class ClientQueue:
    """Pending messages of one client; see the module docstring for the dropping rule."""

    def __init__(self, max_items: int = MAX_QUEUED) -> None:
        self.max_items = max_items
        self.dropped = 0
        self.overflowed = False
        self._items: OrderedDict[object, str] = OrderedDict()
        self._ready = asyncio.Event()
        self._seq = count()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, text: str, progress_of: str | None = None) -> bool:
        """Queue `text`; progress updates name their job. False once overflowed."""
        if self.overflowed:
            return False
        if progress_of is not None:
            key: object = ("progress", progress_of)
            if self._items.pop(key, None) is not None:
                self.dropped += 1
        else:
            key = next(self._seq)
        self._items[key] = text
        while len(self._items) > self.max_items:
            if not self._drop_oldest_progress():
                self.overflowed = True
                self._items.clear()
                self._ready.set()
                return False
        self._ready.set()
        return True

    def _drop_oldest_progress(self) -> bool:
        for key in self._items:
            if isinstance(key, tuple):
                del self._items[key]
                self.dropped += 1
                return True
        return False

    async def get(self) -> str | None:
        """The next message, or None once the client overflowed."""
        while not self._items:
            if self.overflowed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.overflowed:
            return None
        return self._items.popitem(last=False)[1]


class Client:
    def __init__(self, ws: web.WebSocketResponse, transport, who: str, max_queued: int) -> None:
        self.ws = ws
        self.transport = transport
        self.who = who
        self.queue = ClientQueue(max_queued)
        self.jobs: set[str] | None = None  # None: every job

    def wants(self, job_id: str) -> bool:
        return self.jobs is None or job_id in self.jobs


class WebSocketHub:
    def __init__(self, mirror: ServiceMirror, max_queued: int = MAX_QUEUED) -> None:
        self.mirror = mirror
        self.max_queued = max_queued
        self.clients: weakref.WeakSet[Client] = weakref.WeakSet()
        self.dropped_total = 0
        self.disconnected_slow = 0
        mirror.subscribe(self._on_event)

    def close(self) -> None:
        self.mirror.unsubscribe(self._on_event)

    # -- from the mirror ---------------------------------------------------------------
    def _on_event(self, event: MirrorEvent) -> None:
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
        text = json.dumps(update_json(props, event))
        for client in list(self.clients):
            if not client.wants(job_id):
                continue
            before = client.queue.dropped
            if not client.queue.put(text, job_id if droppable else None):
                self._disconnect_slow(client)
            self.dropped_total += client.queue.dropped - before

    def _disconnect_slow(self, client: Client) -> None:
        self.clients.discard(client)
        self.disconnected_slow += 1
        log.warning("websocket client %s fell %d messages behind; disconnected",
                    client.who, client.queue.max_items)
        if client.transport is not None:
            client.transport.abort()

    # -- one client --------------------------------------------------------------------
    async def handle(self, request: web.Request, who: str) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=64 * 1024)
        await ws.prepare(request)
        client = Client(ws, request.transport, who, self.max_queued)
        self.clients.add(client)
        request.app[WEBSOCKETS].add(ws)
        writer = asyncio.create_task(self._write(client), name="ws-writer")
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_message(client, message.data)
        finally:
            self.clients.discard(client)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            request.app[WEBSOCKETS].discard(ws)
        return ws

    async def _write(self, client: Client) -> None:
        while True:
            text = await client.queue.get()
            if text is None:
                await client.ws.close(code=CLOSE_TOO_SLOW, message=b"client too slow")
                return
            try:
                await client.ws.send_str(text)
            except ConnectionError:
                return

    def _on_client_message(self, client: Client, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            self._reply(client, {"type": "error", "error": "InvalidArgument", "field": "message",
                                 "message": "message: malformed JSON"})
            return
        if isinstance(message, dict) and message.get("type") == "ping":
            self._reply(client, {"type": "pong"})
        elif isinstance(message, dict) and "subscribe" in message:
            self._subscribe(client, message["subscribe"])
        else:
            self._reply(client, {"type": "error", "error": "InvalidArgument", "field": "message",
                                 "message": 'message: expected {"subscribe": [job ids]} '
                                            'or {"type": "ping"}'})

    def _subscribe(self, client: Client, jobs) -> None:
        if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
            self._reply(client, {"type": "error", "error": "InvalidArgument",
                                 "field": "subscribe",
                                 "message": "subscribe: expected a list of job ids"})
            return
        client.jobs = set(jobs) or None
        self._reply(client, {"type": "subscribed", "jobs": sorted(jobs)})
        # the current state of each watched job, so a client never misses where it is
        for props in self._job_props(client.jobs):
            client.queue.put(json.dumps(update_json(props, "job.status")))

    def _job_props(self, jobs: set[str] | None) -> list[dict]:
        if not jobs:
            return []
        return [props for ifaces in self.mirror.objects.values()
                if (props := ifaces.get(JOB_IFACE)) and props.get("Id") in jobs]

    @staticmethod
    def _reply(client: Client, body: dict) -> None:
        client.queue.put(json.dumps(body))


WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)


async def close_all(app: web.Application) -> None:
    """on_shutdown: tell every WebSocket client the server is going away."""
    for ws in set(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

