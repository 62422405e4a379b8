"""database.retention_count / retention_age: finished jobs do not pile up for ever."""
from __future__ import annotations

import json
from pathlib import Path

from hypersdk.service.config import parse_config
from hypersdk.service.engine import JobEngine
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.store import open_store

from ..support import test_kinds  # noqa: F401  (registers sleep)
from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, busctl, busctl_json, submit,
                           wait_for_status)
from ..support.wait import job_is, until, wait_until


async def run_to_end(engine: JobEngine, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        job = await engine.submit("sleep", {"steps": 1, "interval": 0}, uid=0)
        await until(lambda: job_is(engine, job.id, lambda job: job.finished),
                    what=f"{job.id} to finish")
        ids.append(job.id)
    return ids


async def test_only_the_newest_finished_jobs_are_kept_and_old_ones_go_by_age(
        tmp_path: Path, database_url: str):
    """The engine running jobs on each store (SQLite, PostgreSQL)."""
    config = parse_config({"database": {"url": database_url,
                                        "retention_count": 3, "retention_age": "30d"},
                           "export": {"base_path": str(tmp_path / "exports")}},
                          "(test)", env={})
    store = await open_store(config.database.url)
    engine = JobEngine(store, config, ProviderRegistry(config))
    removed: list[str] = []
    engine.subscribe(lambda e: removed.append(e.job.id) if e.type == "removed" else None)
    await engine.start()
    try:
        ids = await run_to_end(engine, 5)

        async def kept_are_the_newest() -> bool:  # pruning follows each ending
            return [job.id for job in await store.list_jobs()] == ids[2:] \
                and removed == ids[:2]

        await until(kept_are_the_newest, what="the oldest two pruned and announced")
        assert await store.logs(ids[0]) == [] and await store.logs(ids[4]) != []
        await store.execute("UPDATE jobs SET finished_at = finished_at - 31 * 86400 WHERE id = ?",
                            (ids[2],))
        await engine.prune()
        assert [job.id for job in await store.list_jobs()] == ids[3:]
    finally:
        await engine.shutdown()
        await store.close()


def test_pruned_jobs_leave_the_bus(system_bus, start_hypervisord, database_url):
    """hypervisord on each store (database.url)."""
    daemon = start_hypervisord(database={"retention_count": 2, "url": database_url})
    address = system_bus.address
    paths = []
    for _ in range(3):
        path = json.loads(submit(address, {"steps": 1, "interval": 0}, kind="sleep")
                          .stdout.split()[1])
        wait_for_status(address, path, {"completed"})
        paths.append(path)
    # the pruning follows the third job's ending (in a task of its own)
    wait_until(lambda: busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                                   "ListJobs", "a{sv}", "0")["data"][0] == paths[1:],
               what="the oldest job pruned")
    gone = busctl(address, "get-property", BUS_NAME, paths[0], JOB_IFACE, "Status", check=False)
    assert gone.returncode != 0
    objects = busctl_json(address, "call", BUS_NAME, "/org/hypersdk/HyperSDK1",
                          "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")["data"][0]
    assert paths[0] not in objects and paths[2] in objects
    # JobCounts is a cached count, refreshed after each change
    wait_until(lambda: busctl_json(address, "get-property", BUS_NAME, MANAGER, MANAGER_IFACE,
                                   "JobCounts")["data"]["completed"] == 2,
               what="JobCounts after the pruning")
    assert "removed 1 finished job(s)" in daemon.log()
