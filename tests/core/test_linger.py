"""daemon.finished_job_linger: finished jobs leave the bus (as udisks' jobs do) and stay
readable, retryable and loggable through the Manager by id."""
from __future__ import annotations

import asyncio
import json
import time

from hypersdk.service.store import JobRecord, Store

from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, BusMonitor, busctl,
                           busctl_json, gdbus_call, interfaces_removed, submit, wait_for_status)
from ..support.system import MEMBER, OUTSIDER

ROOT = "/org/hypersdk/HyperSDK1"


def submitted_path(address: str, definition: dict, kind: str, user: str | None = None) -> str:
    return json.loads(submit(address, definition, kind=kind, user=user).stdout.split()[1])


def job_id(path: str) -> str:
    return path.rsplit("/", 1)[-1].replace("_", "-")


def manager(address: str, method: str, signature: str, *args: str,
            user: str | None = None) -> list:
    return busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, method, signature,
                       *args, user=user)["data"]


def refusal(address: str, method: str, signature: str, *args: str,
            user: str | None = None) -> str:
    result = busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, method, signature,
                    *args, user=user, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


def record(address: str, identifier: str, user: str | None = None) -> dict:
    """Manager.GetJob as plain values."""
    [props] = manager(address, "GetJob", "sa{sv}", identifier, "0", user=user)
    return {name: value["data"] for name, value in props.items()}


def managed_paths(address: str) -> set[str]:
    return set(busctl_json(address, "call", BUS_NAME, ROOT, "org.freedesktop.DBus.ObjectManager",
                           "GetManagedObjects")["data"][0])


def test_a_finished_job_leaves_the_bus_and_is_read_from_the_store(system_bus,
                                                                  start_hypervisord):
    start_hypervisord(daemon={"finished_job_linger": 0})
    address = system_bus.address
    with BusMonitor(address) as monitor:
        path = submitted_path(address, {"steps": 2, "interval": 0}, "sleep")
        monitor.wait_for(interfaces_removed(path))
    # clients heard how it ended before it went
    assert monitor.text.index(f"{path}: {JOB_IFACE}.Completed (true") \
        < monitor.text.index(interfaces_removed(path))
    assert busctl(address, "get-property", BUS_NAME, path, JOB_IFACE, "Status",
                  check=False).returncode != 0
    assert path not in managed_paths(address)
    assert path not in manager(address, "ListJobs", "a{sv}", "0")[0]

    job = record(address, job_id(path), user=MEMBER)
    assert (job["Id"], job["Status"], job["Progress"], job["Operation"]) == \
        (job_id(path), "completed", 1.0, "test")
    assert json.loads(job["Result"]) == {"steps": 2} and job["RequestedBy"] == "unix:root"
    assert job["EndTime"] >= job["StartTime"] > 0 and job["Cancelable"] is False

    records, total = manager(address, "ListJobRecords", "a{sv}", "2", "status", "s",
                             "completed", "provider", "s", "")
    assert job_id(path) in [r["Id"]["data"] for r in records] and total == len(records)
    lines = manager(address, "GetJobLog", "sta{sv}", job_id(path), "0", "0", user=MEMBER)[0]
    assert [line[3] for line in lines] == ["step 1", "step 2"]
    after_first = manager(address, "GetJobLog", "sta{sv}", job_id(path), str(lines[0][0]),
                          "0")[0]
    assert [line[3] for line in after_first] == ["step 2"]

    for method, args in (("GetJob", ["{}"]), ("GetJobLog", ["0", "{}"])):
        refused = gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.{method}",
                             f"'{job_id(path)}'", *args, user=OUTSIDER)
        assert "not authorized for org.hypersdk.HyperSDK1.view" in refused.stderr
    assert "no job 'job-0000'" in refusal(address, "GetJob", "sa{sv}", "job-0000", "0")
    assert "no job 'job-0000'" in refusal(address, "GetJobLog", "sta{sv}", "job-0000", "0", "0")
    assert "options.status: one of pending" in refusal(address, "ListJobRecords", "a{sv}",
                                                       "1", "status", "s", "done")
    assert "options.provider: a string" in refusal(address, "ListJobRecords", "a{sv}",
                                                   "1", "provider", "u", "3")
    assert "options.limit" in refusal(address, "ListJobRecords", "a{sv}", "1", "limit", "u",
                                      "1001")


def test_a_job_that_left_the_bus_is_retried_by_id_under_the_job_objects_rules(
        system_bus, start_hypervisord):
    start_hypervisord(daemon={"finished_job_linger": 0})
    address = system_bus.address
    with BusMonitor(address) as monitor:
        roots = submitted_path(address, {"message": "boom"}, "fail")
        members = submitted_path(address, {"message": "boom"}, "fail", user=MEMBER)
        monitor.wait_for(interfaces_removed(roots))
        monitor.wait_for(interfaces_removed(members))
    # another user's job needs cancel-job-other-user, as Job.Retry does
    for method in ("RetryJob", "CancelJob"):
        refused = gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.{method}",
                             f"'{job_id(roots)}'", "{}", user=MEMBER)
        assert "not authorized for org.hypersdk.HyperSDK1.cancel-job-other-user" \
            in refused.stderr
    assert "has already failed" in refusal(address, "CancelJob", "sa{sv}", job_id(members),
                                           "0", user=MEMBER)
    [new_path] = manager(address, "RetryJob", "sa{sv}", job_id(members), "0", user=MEMBER)
    new = record(address, job_id(new_path))
    assert (new["RetryOf"], new["RequestedBy"]) == (job_id(members), f"unix:{MEMBER}")
    assert "no job 'job-0000'" in refusal(address, "RetryJob", "sa{sv}", "job-0000", "0")


def test_a_restart_exports_only_unfinished_and_recently_finished_jobs(
        system_bus, start_hypervisord, service_dir):
    daemon = start_hypervisord(daemon={"finished_job_linger": "60s"})
    address = system_bus.address
    paths = [submitted_path(address, {"steps": 1, "interval": 0}, "sleep") for _ in range(3)]
    for path in paths:
        wait_for_status(address, path, {"completed"})
    daemon.stop()
    old, leaving, recent = (job_id(path) for path in paths)
    store = Store(service_dir / "state" / "hypersdk.db")
    now = time.time()
    pending = JobRecord(id="job-feed0001", kind="sleep", status="pending",
                        definition={"dir": "", "steps": 600, "interval": 0.1,
                                    "step_bytes": 1}, created_at=now, started_by_uid=0)

    async def change() -> None:
        await store.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (now - 3600, old))
        # 8 s of its linger left: more than a start-up takes on a busy machine
        await store.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                            (now - 52, leaving))
        await store.insert_job(pending)
        await store.close()
    asyncio.run(change())

    with BusMonitor(address) as monitor:  # subscribed before the service is back
        daemon.start()
        on_bus = managed_paths(address)
        assert paths[0] not in on_bus
        assert {paths[2], f"{ROOT}/jobs/job_feed0001"} <= on_bus
        # exported for the rest of its linger, then gone
        monitor.wait_for(interfaces_removed(paths[1]))
    assert paths[2] in managed_paths(address)
    records, total = manager(address, "ListJobRecords", "a{sv}", "0")
    assert [r["Id"]["data"] for r in records] == [old, leaving, recent, pending.id]
    assert total == 4
