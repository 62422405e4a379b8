"""/websocket: updates for every job, subscriptions, and slow clients that never hurt others."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import weakref

import aiohttp
import pytest

from hypersdk.http_bridge.auth import Identity
from hypersdk.client.names import JOB_IFACE
from hypersdk.client.objects import ObjectEvent
from hypersdk.http_bridge.websocket import WEBSOCKETS, ClientQueue, WebSocketHub, text_frame

from .conftest import submit_sleep
from ..support.wait import until, wait_until
from .stack import ADMIN_TOKEN, curl


@pytest.fixture
def bridge(shared_bridge):
    """These tests only add jobs and read, so they share one hypervisord and bridge."""
    return shared_bridge


async def collect_until_done(ws, jobs: set[str], timeout: float = 60) -> list[dict]:
    """Messages until every job in `jobs` has sent job.completed."""
    messages, pending = [], set(jobs)
    deadline = time.monotonic() + timeout
    while pending:
        message = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
        messages.append(message)
        if message.get("type") == "job.completed":
            pending.discard(message["job_id"])
    return messages


def statuses(messages: list[dict], job_id: str) -> list[str]:
    """The distinct statuses a client saw for a job, in order."""
    seen: list[str] = []
    for message in messages:
        if message.get("job_id") == job_id and message["type"] in ("job.created", "job.status"):
            if not seen or seen[-1] != message["status"]:
                seen.append(message["status"])
    return seen


async def submit_in_thread(address: str, count: int, **definition) -> list[str]:
    return await asyncio.to_thread(
        lambda: [submit_sleep(address, **definition) for _ in range(count)])


async def test_a_client_sees_a_job_from_creation_to_completion(bridge, system_bus):
    async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
        async with session.ws_connect(bridge.url + "/websocket") as ws:
            (job_id,) = await submit_in_thread(system_bus.address, 1, steps=10, interval=0.1,
                                               step_bytes=1000)
            messages = await collect_until_done(ws, {job_id})
    messages = [m for m in messages if m["job_id"] == job_id]
    assert statuses(messages, job_id) == ["pending", "running", "completed"]
    assert messages[0]["type"] == "job.created"
    progress = [m["progress"] for m in messages if m["type"] == "job.progress"]
    assert len(progress) >= 2 and progress == sorted(progress)
    for message in messages:  # the spec's snippet reads exactly these
        assert {"job_id", "status", "progress"} <= message.keys()
    assert messages[-1]["type"] == "job.completed" and messages[-1]["progress"] == 100.0


async def test_subscribe_limits_updates_to_some_jobs(bridge, system_bus):
    (watched,) = await submit_in_thread(system_bus.address, 1, steps=10, interval=0.05)
    async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
        async with session.ws_connect(bridge.url + "/websocket") as ws:
            await ws.send_json({"subscribe": [watched]})
            while (reply := await ws.receive_json(timeout=5)).get("type") != "subscribed":
                pass  # updates sent before the subscription took effect
            assert reply == {"type": "subscribed", "jobs": [watched]}
            (other,) = await submit_in_thread(system_bus.address, 1, steps=2, interval=0.01)
            messages = await collect_until_done(ws, {watched})
            await ws.send_str("not json")
            error = await ws.receive_json(timeout=5)
    assert {m["job_id"] for m in messages} == {watched}
    assert messages[0]["type"] == "job.status"  # the current state, at once
    assert error["type"] == "error" and error["field"] == "message"
    assert other


def stalled_client(port: int) -> socket.socket:
    """A real WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


@pytest.mark.slow
async def test_hundred_clients_one_never_reading(bridge, system_bus):
    stalled = stalled_client(bridge.port)
    async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
        clients = [await session.ws_connect(bridge.url + "/websocket") for _ in range(99)]
        await asyncio.to_thread(  # every client, the stalled one too, is the hub's now
            wait_until, lambda: "hypersdk_bridge_websocket_clients 100" in
            curl(bridge, "/metrics").body, 20, "the bridge to count 100 clients")
        rss_before = bridge.rss_kib()
        jobs = set(await submit_in_thread(system_bus.address, 40, steps=8, interval=0.05,
                                          step_bytes=4096))
        results = await asyncio.gather(*(collect_until_done(ws, jobs, 120) for ws in clients))
        rss_after = bridge.rss_kib()
        metrics = curl(bridge, "/metrics").body
        for ws in clients:
            await ws.close()
    stalled.close()
    for messages in results:
        for job_id in jobs:
            assert statuses(messages, job_id) == ["pending", "running", "completed"], job_id
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)
    assert "hypersdk_bridge_websocket_clients 100" in metrics, metrics


def test_queue_replaces_a_waiting_progress_update_of_the_same_job():
    queue = ClientQueue(max_items=10)
    queue.put(b"p1", progress_of="job-a")
    queue.put(b"s1")
    queue.put(b"p2", progress_of="job-a")
    assert [queue.pop() for _ in range(len(queue))] == [b"s1", b"p2"] and queue.dropped == 1


def test_queue_drops_old_progress_first_never_status():
    queue = ClientQueue(max_items=3)
    queue.put(b"s1")
    queue.put(b"pa", progress_of="job-a")
    queue.put(b"pb", progress_of="job-b")
    assert queue.put(b"s2")  # full: the oldest progress (pa) goes
    assert [queue.pop() for _ in range(len(queue))] == [b"s1", b"pb", b"s2"]


def test_queue_full_of_status_changes_overflows():
    queue = ClientQueue(max_items=2)
    assert queue.put(b"s1") and queue.put(b"s2")
    assert not queue.put(b"s3")
    assert queue.overflowed and len(queue) == 0


def test_frames_are_rfc6455_text_frames():
    for size in (10, 1000, 70_000):
        frame = text_frame({"x": "y" * size})
        payload = json.dumps({"x": "y" * size}).encode()
        assert frame.endswith(payload) and frame[0] == 0x81
        assert len(frame) - len(payload) == (2 if size < 120 else 4 if size < 65000 else 10)


async def test_websocket_snippet_shape_matches_the_openapi_update_schema(bridge, system_bus):
    schema = json.loads(curl(bridge, "/openapi.json").body)["components"]["schemas"]["Update"]
    async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
        async with session.ws_connect(bridge.url + "/websocket") as ws:
            (job_id,) = await submit_in_thread(system_bus.address, 1, steps=2, interval=0.05)
            messages = await collect_until_done(ws, {job_id})
    for message in messages:
        assert set(message) == set(schema["properties"])
        assert message["type"] in schema["properties"]["type"]["enum"]


class FakeMirror:
    """Stands in for ServiceMirror so the hub can be flooded faster than any real job can;
    the WebSocket server and both clients are real."""

    def __init__(self) -> None:
        self.listeners = []
        self.objects = {}

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        self.listeners.remove(listener)

    def get(self, path: str, interface: str):
        return self.objects.get(path, {}).get(interface)

    def set_status(self, index: int) -> None:
        path = "/org/hypersdk/HyperSDK1/jobs/job_1"
        props = {"Id": "job-1", "Status": f"status-{index}", "Error": "x" * 1000}
        self.objects[path] = {JOB_IFACE: props}
        for listener in self.listeners:
            listener(ObjectEvent("changed", path, JOB_IFACE, {"Status": props["Status"]}))


async def test_a_stalled_client_is_cut_off_and_never_slows_others():
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    mirror = FakeMirror()
    hub = WebSocketHub(mirror, max_queued=16)
    app = web.Application()
    app[WEBSOCKETS] = weakref.WeakSet()

    async def handler(request):
        return await hub.handle(request, Identity("test", "viewer"))

    app.router.add_get("/websocket", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    stalled = stalled_client(server.port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{server.port}/websocket") as ws:
                await until(lambda: len(hub.clients) == 2, what="both clients connected")
                count = 10_000
                statuses_seen: list[str] = []
                read_one = asyncio.Condition()
                reader = asyncio.create_task(_read(ws, count, statuses_seen, read_one))
                for index in range(count):
                    mirror.set_status(index)
                    if index % 8 == 7:  # a reading client keeps up: a lead under max_queued
                        async with read_one:
                            await asyncio.wait_for(read_one.wait_for(
                                lambda: len(statuses_seen) > index - 8), 30)
                await reader
    finally:
        stalled.close()
        await server.close()
    assert statuses_seen == [f"status-{i}" for i in range(count)]
    assert hub.disconnected_slow == 1 and len(hub.clients) == 0


async def _read(ws, count: int, seen: list[str], read_one: asyncio.Condition) -> None:
    """`count` statuses from `ws` into `seen`, notifying `read_one` after each."""
    for _ in range(count):
        seen.append((await ws.receive_json(timeout=30))["status"])
        async with read_one:
            read_one.notify_all()
