"""The real engine, in-process, under faults: export slots and a store on a full disk."""
from __future__ import annotations

import os
from pathlib import Path

from hypersdk.service.config import parse_config
from hypersdk.service.engine import JobEngine
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.store import Store

from ..support import test_kinds  # noqa: F401  (registers slotted-sleep)
from ..support.wait import job_is, until


async def finished(engine: JobEngine, job_id: str, timeout: float = 10) -> str:
    await until(lambda: job_is(engine, job_id, lambda job: job.finished),
                timeout, f"{job_id} to finish")
    return (await engine.get(job_id)).status


async def test_a_job_cancelled_while_it_waits_for_an_export_slot_never_runs(tmp_path: Path):
    config = parse_config({"database": {"path": str(tmp_path / "jobs.db")},
                           "export": {"concurrent_exports": 1,
                                      "base_path": str(tmp_path / "exports")}},
                          "(test)", env={})
    store = Store(Path(config.database.path))
    engine = JobEngine(store, config, ProviderRegistry(config))
    statuses: dict[str, list[str]] = {}
    engine.subscribe(lambda event: statuses.setdefault(event.job.id, []).append(
        event.job.status) if event.type == "status" else None)
    await engine.start()
    try:
        holder = await engine.submit("slotted-sleep", {"steps": 1000, "interval": 0.01}, uid=0)
        waiting = await engine.submit("slotted-sleep", {"steps": 1, "interval": 0}, uid=0)
        await until(lambda: job_is(engine, holder.id, lambda job: job.status == "running"),
                    what="the holder running")
        await engine.cancel(waiting.id)
        await engine.cancel(holder.id)
        assert await finished(engine, holder.id) == "cancelled"
        # a later export takes the slot after the waiting one's worker had it
        later = await engine.submit("slotted-sleep", {"steps": 1, "interval": 0}, uid=0)
        assert await finished(engine, later.id) == "completed"
        record = await store.get_job(waiting.id)
    finally:
        await engine.shutdown()
        await store.close()
    assert (record.status, record.started_at, record.attempts) == ("cancelled", None, 0)
    assert statuses[waiting.id] == ["cancelled"]  # never "running"


async def test_a_full_disk_fails_the_job_and_the_worker_goes_on(tmp_path: Path, small_disk):
    """The store on a real 4 MiB tmpfs that fills up while a job logs: the job fails
    saying so, and the engine's only worker runs the next job once there is room."""
    config = parse_config({"database": {"path": str(small_disk / "jobs.db")},
                           "daemon": {"workers": 1},
                           "export": {"base_path": str(tmp_path / "exports")}},
                          "(test)", env={})
    store = Store(Path(config.database.path))
    engine = JobEngine(store, config, ProviderRegistry(config))
    await engine.start()
    filler = small_disk / "filler"
    try:
        with open(filler, "wb") as fh:  # leave ~256 KiB for the store
            fh.write(b"\0" * (os.statvfs(small_disk).f_bavail * 4096 - (256 << 10)))
        flood = await engine.submit("logflood", {"lines": 20000, "padding": 200}, uid=0)
        assert await finished(engine, flood.id, 30) == "failed"
        assert "the job store could not be written (database or disk is full)" \
            in (await engine.get(flood.id)).error
        filler.unlink()
        after = await engine.submit("sleep", {"steps": 1, "interval": 0}, uid=0)
        assert await finished(engine, after.id) == "completed"
        assert (await store.get_job(flood.id)).status == "failed"  # recorded once there was room
    finally:
        await engine.shutdown()
        await store.close()
