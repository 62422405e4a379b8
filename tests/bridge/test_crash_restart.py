"""hypervisord killed (SIGKILL) under a running job and restarted: the bridge tells what the
restarted service says, the job `failed` ("interrupted: ..."), in /jobs/query, /jobs and
over the WebSocket, and hypervisord announces that change on the bus.

Before: the recovery changed the job without a signal, and the bridge replaced its mirror
without telling its WebSocket clients, so a client that saw the job running never heard
it failed, and a bridge whose snapshot came before the recovery answered `running` for
good.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from hypersdk.client.names import BUS_NAME, job_path

from ..support.hypervisord import Hypervisord
from ..support.wait import until
from .conftest import submit_sleep
from .stack import curl, wait_status


async def status_signals(address: str, path: str) -> tuple[MessageBus, list[str]]:
    """A connection of the test's own that collects the Status values hypervisord
    announces for `path` (PropertiesChanged), whoever owns the name at the time."""
    bus = await MessageBus(bus_address=address).connect()
    seen: list[str] = []

    def on_message(msg: Message) -> None:
        if (msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged"
                and msg.path == path and "Status" in msg.body[1]):
            seen.append(msg.body[1]["Status"].value)

    bus.add_message_handler(on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=[f"type='signal',sender='{BUS_NAME}',path='{path}'"]))
    return bus, seen


async def updates_until_completed(ws, job_id: str, timeout: float = 20) -> list[dict]:
    """WebSocket messages about `job_id` up to its job.completed."""
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    while not messages or messages[-1]["type"] != "job.completed":
        try:
            message = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(f"no job.completed for {job_id} within {timeout} s; "
                                 f"its updates: {messages}") from None
        if message.get("job_id") == job_id:
            messages.append(message)
    return messages


async def test_a_job_killed_with_hypervisord_shows_failed_after_the_restart(bridge, system_bus):
    job_id = await asyncio.to_thread(submit_sleep, system_bus.address, steps=600, interval=0.1)
    await asyncio.to_thread(wait_status, bridge, job_id, {"running"})
    bus, announced = await status_signals(system_bus.address, job_path(job_id))
    again = Hypervisord(bridge.daemon.config_path, system_bus.address)
    try:
        async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
            async with session.ws_connect(bridge.url + "/websocket") as ws:
                await ws.send_json({"subscribe": [job_id]})
                assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
                assert (await ws.receive_json(timeout=5))["status"] == "running"
                await asyncio.to_thread(bridge.daemon.kill)
                await asyncio.to_thread(again.start)
                updates = await updates_until_completed(ws, job_id)
        query = await asyncio.to_thread(curl, bridge, f"/jobs/query?job_id={job_id}")
        running = await asyncio.to_thread(curl, bridge, "/jobs?status=running")
        failed = await asyncio.to_thread(curl, bridge, "/jobs?status=failed")
        await until(lambda: "failed" in announced, what="the restarted service's signal")
    finally:
        await asyncio.to_thread(again.stop)
        bus.disconnect()

    assert [u["status"] for u in updates if u["type"] == "job.status"] == ["failed"]
    assert updates[-1]["status"] == "failed"
    assert updates[-1]["error"].startswith("interrupted: hypervisord stopped")
    assert query.json()["status"] == "failed"
    assert query.json()["error"] == updates[-1]["error"]
    assert job_id not in [j["job_id"] for j in running.json()["jobs"]]
    assert job_id in [j["job_id"] for j in failed.json()["jobs"]]
    assert announced == ["failed"]  # the restarted service said so on the bus
