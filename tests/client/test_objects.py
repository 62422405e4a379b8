"""The shared client's mirror (bridge and console alike) against a fake hypervisord.

The fake is a small dbus-fast peer on a private dbus-daemon that owns the service's
name: the real service cannot be made to send a signal in the same breath as its
GetManagedObjects reply on demand, and that is the race these tests pin down.
"""
from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message, MessageType, Variant

from hypersdk.client.bus import connect
from hypersdk.client.names import (BUS_NAME, JOB_IFACE,
                                   PROPERTIES_IFACE, job_path)
from hypersdk.client.objects import ObjectEvent, ServiceObjects
from hypersdk.tui.client import HyperClient
from tests.support.system import PrivateSystemBus
from tests.support.wait import until

JOB_ID = "job-0a1b2c"


@pytest.fixture
async def fake_service_racing_its_snapshot(service_dir):
    """A fake hypervisord whose snapshot says `running` and whose very next message, a
    PropertiesChanged, says `failed` (as a restarted service failing an interrupted job)."""
    bus = await asyncio.to_thread(PrivateSystemBus.start, service_dir / "bus")
    address = f"unix:path={service_dir / 'bus' / 'system_bus_socket'}"
    peer = await connect(address)
    path = job_path(JOB_ID)

    def on_message(msg: Message) -> bool | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.member != "GetManagedObjects":
            return None
        snapshot = {path: {JOB_IFACE: {"Id": Variant("s", JOB_ID),
                                       "Status": Variant("s", "running")}}}
        peer.send(Message.new_method_return(msg, "a{oa{sa{sv}}}", [snapshot]))
        peer.send(Message.new_signal(path, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as",
                                     [JOB_IFACE, {"Status": Variant("s", "failed")}, []]))
        return True

    peer.add_message_handler(on_message)
    await peer.request_name(BUS_NAME)
    try:
        yield address, peer
    finally:
        peer.disconnect()
        await asyncio.to_thread(bus.stop)


async def test_fake_service_a_change_sent_right_after_the_snapshot_is_kept(
        fake_service_racing_its_snapshot):
    address, _ = fake_service_racing_its_snapshot
    objects = ServiceObjects(address)
    changed = asyncio.Event()
    objects.subscribe(lambda event: changed.set() if event.type == "changed" else None)
    try:
        await objects.connect()
        await asyncio.wait_for(changed.wait(), 10)
        assert objects.healthy
        assert objects.get(job_path(JOB_ID), JOB_IFACE)["Status"] == "failed"
    finally:
        await objects.stop()


async def test_fake_service_the_console_shows_the_change_not_the_older_snapshot(
        fake_service_racing_its_snapshot):
    address, _ = fake_service_racing_its_snapshot
    client = HyperClient(address)
    heard = asyncio.Event()
    client.subscribe(lambda event: heard.set()
                     if event.type == "job" and event.job_id == JOB_ID else None)
    try:
        await client.connect()
        await asyncio.wait_for(heard.wait(), 10)
        assert client.mirror.service_up
        assert client.mirror.jobs[JOB_ID].status == "failed"
    finally:
        client.close()


async def test_fake_service_a_new_owner_is_told_as_health_then_differences(
        fake_service_racing_its_snapshot):
    """The name passes to a new owner that has no objects: listeners hear the outage, and
    after its snapshot what differs from what they last heard (the job is gone)."""
    address, first_owner = fake_service_racing_its_snapshot
    objects = ServiceObjects(address)
    events: list[ObjectEvent] = []
    objects.subscribe(events.append)
    runner = asyncio.create_task(objects.run())
    newcomer = await connect(address)

    def empty_snapshot(msg: Message) -> bool | None:
        if msg.member != "GetManagedObjects":
            return None
        newcomer.send(Message.new_method_return(msg, "a{oa{sa{sv}}}", [{}]))
        return True

    newcomer.add_message_handler(empty_snapshot)
    try:
        failed = ObjectEvent("changed", job_path(JOB_ID), JOB_IFACE, {"Status": "failed"})
        await until(lambda: failed in events, 10, "the job's change")
        await newcomer.request_name(BUS_NAME)  # queued behind the first owner
        events.clear()
        first_owner.disconnect()
        removed = ObjectEvent("removed", job_path(JOB_ID), JOB_IFACE)
        await until(lambda: removed in events, 10, "the job's removal")
        assert [event.type for event in events] == ["health", "health", "removed"]
        assert objects.healthy and objects.objects == {}
    finally:
        await objects.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        newcomer.disconnect()
