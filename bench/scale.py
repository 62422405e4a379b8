"""Benchmark: hypervisord, the bridge and the console with 50,000 finished jobs stored.

Fills a store through the Store API with --jobs finished jobs (export-shaped
definitions and results, a few log lines each, finished over the last 30 days; the
last --recent ones within daemon.finished_job_linger), then starts on a private
system bus with the real polkitd, in the same run:

- hypervisord on an empty store and on the full one: time to READY=1;
- GetManagedObjects: reply size against the bus's 32 MiB message limit, and what
  one object per stored job (as before the linger) would make it;
- ListJobs, ListJobRecords (first page, last page, a status filter) and GetJob:
  latency and reply size;
- a real hypersdk-bridge: start time, GET /jobs (first and last page of 100 and of
  1000), /jobs/query of a job no longer on the bus, against GET /health;
- the console's client (tui/client.py): connect and load its mirror.

    .venv/bin/python bench/scale.py [--jobs 50000] [--recent 20] [--repeat 20]

Latencies are medians of --repeat sequential calls (the machine is shared: noisy).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from dbus_fast import Message, MessageType, Variant

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUS_LIMIT = 32 * 1024 * 1024  # dbus-daemon's max_message_size on the system bus
LINGER = 300.0


def export_job(index: int, finished_at: float) -> tuple:
    """(JobRecord, result, log lines) of a finished export as the engine stores it."""
    from hypersdk.service.store import JobRecord

    vm = f"vm-{index}"
    definition = {"vm_identifier": vm, "provider": "vsphere", "export_method": "ova",
                  "export_path": f"/var/lib/hypersdk/exports/{vm}", "output_format": "qcow2",
                  "compress": False, "hyper2kvm_integration": {"enabled": False}}
    status = random.choice(("completed",) * 8 + ("failed", "cancelled"))
    job = JobRecord(id=f"job-{index:012x}", kind="export", status="pending",
                    definition=definition, vm=vm, provider="vsphere", started_by_uid=0,
                    created_at=finished_at - 600, requested_by="rest:admin")
    result = {"vm": vm, "files": [{"path": f"/var/lib/hypersdk/exports/{vm}/{vm}.ova",
                                   "size": 2 << 30, "sha256": "ab" * 32}],
              "duration_seconds": 600.0} if status == "completed" else {}
    lines = [f"exporting {vm}", "download disk 1/1", "packaging OVA",
             "done" if status == "completed" else "stopped"]
    return job, status, result, lines


async def fill_store(path: Path, count: int, recent: int) -> float:
    """`count` finished jobs through the Store API; the last `recent` finished within
    the linger, the others over the 30 days before it. Returns the seconds taken."""
    from hypersdk.service.store import Store

    started = time.monotonic()
    store = Store(path)
    now = time.time()
    for index in range(count):
        if index >= count - recent:
            finished_at = now - 60 + index - count
        else:
            finished_at = now - LINGER - 30 * 86400 * (count - index) / count
        job, status, result, lines = export_job(index, finished_at)
        await store.insert_job(job)
        job.status, job.started_at, job.finished_at = status, finished_at - 590, finished_at
        job.result, job.attempts = result, 1
        job.error = "" if status == "completed" else f"job {status}: disk full"
        job.bytes_done = job.bytes_total = 2 << 30
        await store.set_status(job)
        for offset, line in enumerate(lines):
            await store.append_log(job.id, finished_at - 590 + offset, "info", line)
    await store.close()
    return time.monotonic() - started


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


class Caller:
    """Timed method calls to hypervisord over a dbus-fast connection, as root."""

    def __init__(self, bus) -> None:
        self.bus = bus

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list | None = None) -> tuple[list, int, float]:
        """(reply body, reply size in bytes, seconds)."""
        message = Message(destination="org.hypersdk.HyperSDK1", path=path,
                          interface=interface, member=member, signature=signature,
                          body=body or [])
        started = time.perf_counter()
        reply = await self.bus.call(message)
        elapsed = time.perf_counter() - started
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return reply.body, len(reply._marshall(False)), elapsed

    async def timed(self, repeat: int, *args) -> tuple[list, int, float]:
        """The reply, its size and the median seconds of `repeat` calls."""
        times = []
        for _ in range(repeat):
            body, size, elapsed = await self.call(*args)
            times.append(elapsed)
        return body, size, statistics.median(times)


async def measure_dbus(address: str, count: int, repeat: int) -> None:
    from hypersdk.client.bus import connect
    from hypersdk.client.names import MANAGER_IFACE as manager
    from hypersdk.client.names import MANAGER_PATH, OBJECT_MANAGER_IFACE, ROOT_PATH

    bus = await connect(address)
    caller = Caller(bus)
    try:
        objects, size, seconds = await caller.timed(
            repeat, ROOT_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        jobs_on_bus = sum(1 for p in objects[0] if "/jobs/" in p)
        record, record_size, get_seconds = await caller.timed(
            repeat, MANAGER_PATH, manager, "GetJob", "sa{sv}", ["job-000000000001", {}])
        print(f"GetManagedObjects: {len(objects[0])} objects ({jobs_on_bus} jobs), "
              f"{size / 1024:.1f} KiB = {size / BUS_LIMIT:.5f} of the 32 MiB limit, "
              f"{median_ms([seconds]):.1f} ms")
        print(f"  one object per stored job (before the linger) would be about "
              f"{record_size * count / 2 ** 20:.1f} MiB = {record_size * count / BUS_LIMIT:.2f} "
              f"of the limit ({record_size} bytes per job)")
        print(f"GetJob (a job off the bus): {median_ms([get_seconds]):.2f} ms")
        paths, size, seconds = await caller.timed(repeat, MANAGER_PATH, manager, "ListJobs",
                                                  "a{sv}", [{}])
        print(f"ListJobs: {len(paths[0])} paths, {size} bytes, {median_ms([seconds]):.2f} ms")
        for label, options in (
                ("first page", {}),
                ("last page", {"offset": Variant("t", max(0, count - 1000))}),
                ("status=failed", {"status": Variant("s", "failed")})):
            (records, total), size, seconds = await caller.timed(
                repeat, MANAGER_PATH, manager, "ListJobRecords", "a{sv}", [options])
            print(f"ListJobRecords {label}: {len(records)} of {total} records, "
                  f"{size / 2 ** 20:.2f} MiB = {size / BUS_LIMIT:.3f} of the limit, "
                  f"{median_ms([seconds]):.1f} ms")
    finally:
        bus.disconnect()


async def measure_rest(url: str, count: int, repeat: int) -> None:
    async with aiohttp.ClientSession() as session:
        async def timed(path: str) -> tuple[dict, float]:
            times, body = [], {}
            for _ in range(repeat):
                started = time.perf_counter()
                async with session.get(url + path) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"{path}: {response.status} {body}")
                times.append(time.perf_counter() - started)
            return body, statistics.median(times)

        _, health = await timed("/health")
        print(f"REST GET /health: {health * 1000:.2f} ms (baseline)")
        for path in ("/jobs", f"/jobs?offset={max(0, count - 100)}", "/jobs?limit=1000",
                     f"/jobs?limit=1000&offset={max(0, count - 1000)}", "/jobs?status=failed&limit=1000",
                     "/jobs/query?job_id=job-000000000001"):
            body, seconds = await timed(path)
            listed = (f"{len(body['jobs'])} of {body['total']} jobs" if "jobs" in body
                      else f"status {body['status']}")
            print(f"REST GET {path}: {listed}, {seconds * 1000:.1f} ms = "
                  f"{seconds / health:.1f}x /health")


async def measure_console(address: str) -> None:
    from hypersdk.tui.client import HyperClient

    started = time.perf_counter()
    client = HyperClient(address)
    await client.connect()
    seconds = time.perf_counter() - started
    print(f"console client: connected and mirrored {len(client.mirror.jobs)} jobs in "
          f"{seconds * 1000:.0f} ms")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--recent", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    from tests.bridge.stack import ANY_PORT, Bridge
    from tests.support.hypervisord import Hypervisord, write_config
    from tests.support.system import PrivateSystemBus, start_polkitd, stop_process

    work = Path(tempfile.mkdtemp(prefix="hypersdk-bench-scale-"))
    work.chmod(0o755)
    bus = PrivateSystemBus.start(work / "bus")
    polkitd = start_polkitd(bus, work / "polkit")
    settings = {"daemon": {"address": ANY_PORT, "log_level": "warning",
                           "finished_job_linger": f"{LINGER:g}s"},
                "database": {"path": str(work / "state" / "hypersdk.db"),
                             "retention_count": 0, "retention_age": 0},
                "api": {"auth": "none"}}
    random.seed(16)
    daemon = bridge = None
    try:
        empty = Hypervisord(write_config(work, **settings), bus.address)
        started = time.monotonic()
        empty.start()
        empty_start = time.monotonic() - started
        empty.stop()
        (work / "state" / "hypersdk.db").unlink()

        filled = asyncio.run(fill_store(work / "state" / "hypersdk.db", args.jobs, args.recent))
        print(f"filled the store with {args.jobs} finished jobs in {filled:.1f} s "
              f"({(work / 'state' / 'hypersdk.db').stat().st_size / 2 ** 20:.0f} MiB)")
        daemon = Hypervisord(write_config(work, **settings), bus.address)
        started = time.monotonic()
        daemon.start()
        full_start = time.monotonic() - started
        print(f"hypervisord start to READY=1: {full_start:.2f} s with {args.jobs} stored jobs, "
              f"{empty_start:.2f} s with none ({full_start / empty_start:.2f}x)")
        asyncio.run(measure_dbus(bus.address, args.jobs, args.repeat))

        bridge = Bridge(daemon.config_path, bus.address)
        started = time.monotonic()
        bridge.start()
        print(f"bridge start to healthy: {time.monotonic() - started:.2f} s")
        asyncio.run(measure_rest(bridge.url, args.jobs, args.repeat))
        asyncio.run(measure_console(bus.address))
        print(f"bridge RSS {bridge.rss_kib() / 1024:.1f} MiB")
    finally:
        if bridge is not None:
            bridge.stop()
        if daemon is not None:
            daemon.stop()
        stop_process(polkitd)
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
