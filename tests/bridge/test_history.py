"""The REST API for jobs that have left the bus (daemon.finished_job_linger: 0): read,
listed, logged and retried from hypervisord's store, in the documented shapes."""
from __future__ import annotations

import json

from ..support.cli import BusMonitor, interfaces_removed, submit
from .stack import curl, post_json, wait_status


def submitted(address: str, definition: dict, kind: str) -> tuple[str, str]:
    """(object path, job id) of a job submitted over D-Bus."""
    path = json.loads(submit(address, definition, kind=kind).stdout.split()[1])
    return path, path.rsplit("/", 1)[-1].replace("_", "-")


def test_jobs_that_left_the_bus_are_read_listed_logged_and_retried(start_bridge, system_bus):
    bridge = start_bridge(daemon={"finished_job_linger": 0})
    address = system_bus.address
    with BusMonitor(address) as monitor:
        done_path, done = submitted(address, {"steps": 2, "interval": 0, "step_bytes": 10},
                                    "sleep")
        failed_path, failed = submitted(address, {"message": "disk full"}, "fail")
        monitor.wait_for(interfaces_removed(done_path))
        monitor.wait_for(interfaces_removed(failed_path))

    job = curl(bridge, f"/jobs/query?job_id={done}").json()
    assert (job["job_id"], job["status"], job["progress"], job["bytes_done"]) == \
        (done, "completed", 100.0, 20)
    assert job["result"] == {"steps": 2} and job["ended_at"].endswith("Z")
    assert job["requested_by"] == "unix:root" and job["operation"] == "test"
    progress = curl(bridge, f"/jobs/progress/{done}").json()
    assert progress == {"job_id": done, "status": "completed", "stage": "sleeping",
                        "percentage": 100.0, "progress_valid": True, "bytes_done": 20,
                        "bytes_total": 20, "rate": 0, "eta": None}
    eta = curl(bridge, f"/jobs/eta/{done}").json()
    assert eta == {"job_id": done, "status": "completed", "eta_seconds": None,
                   "expected_end_time": None, "rate": 0, "percentage": 100.0}

    listed = curl(bridge, "/jobs?limit=1000").json()
    assert [j["job_id"] for j in listed["jobs"]][-2:] == [done, failed]
    assert listed["total"] == len(listed["jobs"]) and listed["jobs"][-2] == job
    page = curl(bridge, f"/jobs?limit=1&offset={listed['total'] - 1}").json()
    assert [j["job_id"] for j in page["jobs"]] == [failed] and page["total"] == listed["total"]
    only_failed = curl(bridge, "/jobs?status=failed").json()
    assert failed in [j["job_id"] for j in only_failed["jobs"]]
    assert all(j["status"] == "failed" for j in only_failed["jobs"])

    for follow in ("", "?follow=true"):  # a job gone from the bus has ended: no waiting
        logs = curl(bridge, f"/jobs/logs/{done}{follow}", timeout=10)
        assert logs.status == 200
        assert [line for line in logs.body.splitlines() if " step " in line][-1] \
            .endswith("step 2")

    retried = post_json(bridge, f"/jobs/retry/{failed}", {})
    assert retried.status == 200 and retried.json()["status"] == "pending"
    again = wait_status(bridge, retried.json()["job_id"], {"failed"})
    assert again["retry_of"] == failed and again["error"] == "disk full"

    cancel = post_json(bridge, f"/jobs/cancel/{done}", {})
    assert cancel.status == 400 and "has already completed" in cancel.json()["message"]
    for path in ("/jobs/query?job_id=job-0123456789ab", "/jobs/progress/job-0123456789ab",
                 "/jobs/logs/job-ffff"):
        missing = curl(bridge, path)
        assert missing.status == 404 and missing.json()["field"] in ("job_id", "id"), path
    assert post_json(bridge, "/jobs/retry/job-2", {}).status == 404
