"""HyperClient on its own: reconnecting when the bus itself goes away and comes back."""
from __future__ import annotations

import asyncio

from hypersdk.tui.client import HyperClient
from tests.support.hypervisord import Hypervisord, write_config
from tests.support.system import PrivateSystemBus
from tests.support.wait import until


async def test_client_reconnects_after_the_bus_restarts_and_sees_the_service(service_dir):
    bus_dir = service_dir / "bus"
    bus = PrivateSystemBus.start(bus_dir)
    address = f"unix:path={bus_dir / 'system_bus_socket'}"
    client = HyperClient(address)
    events: list[str] = []
    client.subscribe(lambda event: events.append(event.type))
    runner = asyncio.create_task(client.run())
    daemon = None
    try:
        await until(lambda: client.connected, what="the first connection")
        assert not client.mirror.service_up  # nobody owns the name yet

        await asyncio.to_thread(bus.stop)
        await until(lambda: not client.connected, what="the disconnect")
        bus = await asyncio.to_thread(PrivateSystemBus.start, bus_dir)
        await until(lambda: client.connected, what="the reconnect")

        daemon = Hypervisord(write_config(service_dir), address)
        await asyncio.to_thread(daemon.start)
        await until(lambda: client.mirror.service_up, what="the service")
        assert client.mirror.version and "service" in events
        job_id = await client.submit({"steps": 2, "interval": 0.05}, "sleep")
        await until(lambda: job_id in client.mirror.jobs
                         and client.mirror.jobs[job_id].status == "completed", what="the job")
    finally:
        client.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        if daemon:
            await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(bus.stop)


async def test_mirror_follows_job_counts_and_keeps_capabilities(system_bus, hypervisord):
    client = HyperClient(system_bus.address)
    await client.connect()
    try:
        assert client.mirror.service_up and client.mirror.version
        providers = client.mirror.providers()
        assert providers
        before = client.mirror.job_counts.get("completed", 0)
        job_id = await client.submit({"steps": 1, "interval": 0.01}, "sleep")
        await until(lambda: client.mirror.job_counts.get("completed", 0) == before + 1,
                         what="JobCounts")
        assert client.mirror.jobs[job_id].status == "completed"
        assert client.mirror.providers() == providers  # a JobCounts change keeps the rest
    finally:
        client.close()


async def test_a_job_killed_with_hypervisord_ends_failed_for_a_connected_client(
        system_bus, hypervisord):
    """SIGKILL under a running job, then a restart: the console's client hears the job end
    (as a job screen following its log needs) and shows it failed, as the service does."""
    client = HyperClient(system_bus.address)
    ended = []
    client.subscribe(lambda event: ended.append(event) if event.type == "completed" else None)
    runner = asyncio.create_task(client.run())
    again = Hypervisord(hypervisord.config_path, system_bus.address)
    try:
        await until(lambda: client.mirror.service_up, what="the service")
        job_id = await client.submit({"steps": 600, "interval": 0.1}, "sleep")
        await until(lambda: job_id in client.mirror.jobs
                         and client.mirror.jobs[job_id].status == "running", what="running")
        await asyncio.to_thread(hypervisord.kill)
        await asyncio.to_thread(again.start)
        await until(lambda: any(e.job_id == job_id for e in ended), timeout=10,
                         what="the job's end")
        assert client.mirror.jobs[job_id].status == "failed"
        (end,) = [e for e in ended if e.job_id == job_id]
        assert not end.success and end.message.startswith("interrupted: hypervisord stopped")
    finally:
        client.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await asyncio.to_thread(again.stop)
