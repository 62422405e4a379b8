"""The REST API against a real hypervisord on a private bus, called with real curl."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from ..support.wait import wait_for_value
from .stack import curl, post_json, wait_status


@pytest.fixture
def bridge(shared_bridge):
    """These tests only add jobs and read, so they share one hypervisord and bridge."""
    return shared_bridge


def test_health_and_capabilities_have_the_documented_shape(bridge):
    health = curl(bridge, "/health")
    assert health.status == 200
    assert health.json() == {"status": "healthy", "version": "1.0.0"}
    caps = curl(bridge, "/capabilities").json()
    assert caps["version"] == "1.0.0"
    assert "sleep" in caps["job_kinds"] and "qcow2" in caps["output_formats"]


def test_job_reads_come_from_the_service(bridge, sleep_job):
    job_id = sleep_job(steps=4, interval=0.1, step_bytes=1000)
    job = wait_status(bridge, job_id, {"completed"})
    assert job["job_id"] == job_id and job["operation"] == "test"
    assert job["progress"] == 100.0 and job["bytes_done"] == 4000
    assert job["created_at"].endswith("Z") and job["ended_at"]
    assert job["result"] == {"steps": 4}
    progress = curl(bridge, f"/jobs/progress/{job_id}").json()
    assert progress["percentage"] == 100.0
    assert progress["bytes_done"] == progress["bytes_total"] == 4000
    eta = curl(bridge, f"/jobs/eta/{job_id}").json()
    assert eta["job_id"] == job_id and eta["eta_seconds"] is None
    logs = curl(bridge, f"/jobs/logs/{job_id}")
    assert logs.status == 200
    messages = [line.split(" ", 2)[2] for line in logs.body.splitlines()]
    assert [m for m in messages if m.startswith("step")] == [f"step {i}" for i in range(1, 5)]


def test_progress_of_a_running_job_moves(bridge, sleep_job):
    job_id = sleep_job(steps=20, interval=0.1, step_bytes=1 << 20)
    wait_status(bridge, job_id, {"running"})
    seen: set[float] = set()

    def percentages() -> set[float]:
        progress = curl(bridge, f"/jobs/progress/{job_id}").json()
        if progress["progress_valid"]:
            assert progress["bytes_total"] == 20 << 20
            seen.add(progress["percentage"])
        return seen
    wait_for_value(percentages, lambda seen: len(seen) >= 3, 10, "three percentages")


def test_logs_follow_streams_until_the_job_ends(bridge, sleep_job):
    job_id = sleep_job(steps=10, interval=0.1, step_bytes=10)
    logs = curl(bridge, f"/jobs/logs/{job_id}?follow=true")  # sent while the job runs
    assert logs.status == 200
    steps = [line for line in logs.body.splitlines() if " step " in line]
    assert len(steps) == 10 and steps[-1].endswith("step 10")
    assert curl(bridge, f"/jobs/query?job_id={job_id}").json()["status"] == "completed"


def test_list_jobs_filters_and_pages(bridge, sleep_job):
    ids = [sleep_job(steps=1, interval=0.01) for _ in range(3)]
    for job_id in ids:
        wait_status(bridge, job_id, {"completed"})
    everything = curl(bridge, "/jobs?status=completed&limit=1000").json()
    listed = [j["job_id"] for j in everything["jobs"]]
    assert listed[-3:] == ids and everything["total"] == len(listed)  # oldest first
    offset = len(listed) - 2
    page = curl(bridge, f"/jobs?status=completed&limit=2&offset={offset}").json()
    assert page["limit"] == 2 and page["offset"] == offset
    assert [j["job_id"] for j in page["jobs"]] == ids[1:]
    assert all(j["status"] == "completed" for j in page["jobs"])
    assert curl(bridge, "/jobs?provider=no-such-provider").json()["total"] == 0
    bad = curl(bridge, "/jobs?status=sleeping")
    assert bad.status == 400 and bad.json()["field"] == "status"
    assert curl(bridge, "/jobs?limit=-1").json()["field"] == "limit"


def test_cancel_a_running_job(bridge, sleep_job):
    job_id = sleep_job(steps=100, interval=0.1)
    wait_status(bridge, job_id, {"running"})
    answer = post_json(bridge, f"/jobs/cancel/{job_id}", {})
    assert answer.status == 200 and answer.json()["cancel_requested"] is True
    assert wait_status(bridge, job_id, {"cancelled", "failed"})["status"] == "cancelled"
    again = post_json(bridge, f"/jobs/cancel/{job_id}", {})
    assert again.status == 400 and again.json()["error"] == "InvalidArgument"


def test_retry_a_failed_job(bridge, system_bus, sleep_job):
    from ..support.cli import submit

    reply = submit(system_bus.address, {"message": "disk full"}, kind="fail")
    failed = json.loads(reply.stdout.split()[1]).rsplit("/", 1)[-1].replace("_", "-")
    assert wait_status(bridge, failed, {"failed"})["error"] == "disk full"
    retried = post_json(bridge, f"/jobs/retry/{failed}", {})
    assert retried.status == 200 and retried.json()["status"] == "pending"
    new_job = wait_status(bridge, retried.json()["job_id"], {"failed"})
    assert new_job["retry_of"] == failed and new_job["job_id"] != failed
    again = post_json(bridge, f"/jobs/retry/{retried.json()['job_id']}", {})
    assert again.status == 200  # a failed retry may be retried again
    completed = sleep_job(steps=1, interval=0.01)
    wait_status(bridge, completed, {"completed"})
    refused = post_json(bridge, f"/jobs/retry/{completed}", {})
    assert refused.status == 400 and refused.json()["field"] == "job"


def test_unknown_job_is_404_json(bridge):
    for path in ("/jobs/query?job_id=job-0123456789ab", "/jobs/progress/job-0123456789ab",
                 "/jobs/eta/nonsense", "/jobs/logs/job-ffff", "/jobs/cancel/job-1",
                 "/jobs/retry/job-2"):
        answer = curl(bridge, path, *(["-X", "POST"] if "/jobs/c" in path or "/jobs/r" in path
                                      else []))
        assert answer.status == 404, path
        body = answer.json()
        assert body["error"] == "NotFound" and body["field"] in ("job_id", "id")


def test_bad_requests_name_the_problem(bridge):
    malformed = post_json(bridge, "/jobs/submit", '{"provider": "vsphere",')
    assert malformed.status == 400
    assert malformed.json()["field"] == "body" and "malformed JSON" in malformed.json()["message"]
    not_object = post_json(bridge, "/convert", "[1, 2]")
    assert not_object.status == 400 and not_object.json()["field"] == "body"
    missing = curl(bridge, "/jobs/query")
    assert missing.status == 400 and missing.json()["field"] == "job_id"
    no_route = curl(bridge, "/no/such/thing")
    assert no_route.status == 404 and no_route.json()["error"] == "NotFound"
    wrong_method = curl(bridge, "/jobs/submit")
    assert wrong_method.status == 405 and wrong_method.json()["error"] == "MethodNotAllowed"
    websocket = curl(bridge, "/websocket")
    assert websocket.status == 426


def test_service_errors_map_through_the_table(bridge, tmp_path):
    unknown_provider = post_json(bridge, "/vms/list", {"provider": "vsphere"})
    assert unknown_provider.status == 400
    assert unknown_provider.json()["field"] == "provider"
    info = curl(bridge, "/vms/info?identifier=vm-123&provider=vsphere")
    assert info.status == 400 and info.json()["field"] == "provider"
    # without provider: the only one there is, the always-on ova provider, is asked
    only_ova = curl(bridge, "/vms/info?identifier=vm-123")
    assert only_ova.status == 404 and "no OVA/OVF 'vm-123'" in only_ova.json()["message"]
    convert = post_json(bridge, "/convert", {"source_path": "relative.ovf",
                                              "output_path": str(tmp_path)})
    assert convert.status == 400 and convert.json()["field"]
    relative = curl(bridge, "/parse-vmdk?path=disk.vmdk")
    assert relative.status == 400 and relative.json()["field"] == "path"


def test_parse_vmdk_reads_a_real_vmdk(bridge):
    disk = bridge.config_path.parent / "parse-me.vmdk"  # callers may name files under its roots
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=monolithicSparse", str(disk), "16M"], check=True)
    answer = curl(bridge, f"/parse-vmdk?path={disk}")
    assert answer.status == 200, answer.body
    parsed = answer.json()
    assert (parsed["path"], parsed["capacity_bytes"], parsed["create_type"]) == \
        (str(disk), 16 << 20, "monolithicSparse")
    [extent] = parsed["extents"]
    assert (extent["type"], extent["size_bytes"], extent["complete"]) == ("SPARSE", 16 << 20, True)
    assert parsed["complete"] and parsed["parent"] is None


def test_metrics_are_prometheus_text(bridge, sleep_job):
    wait_status(bridge, sleep_job(steps=1, interval=0.01), {"completed"})
    text = curl(bridge, "/metrics").body
    assert "# TYPE hypersdk_jobs gauge" in text
    assert re.search(r'^hypersdk_jobs\{status="completed"\} [1-9]', text, re.MULTILINE)
    assert "hypersdk_up 1" in text
    assert 'hypersdk_bridge_requests_total{method="GET",route="/jobs/query",status="200"}' in text


def test_text_dbus_cannot_carry_is_refused_naming_where(bridge):
    for body, field in (('{"name": "a\\u0000b", "cron": "0 2 * * *"}', "name"),
                        ('{"x\\udbda": 1, "cron": "0 2 * * *"}', "body"),
                        ('{"job_definition": {"tags": ["ok", "\\ud800"]}}',
                         "job_definition.tags[1]")):
        answer = post_json(bridge, "/schedules/create", body)
        assert answer.status == 400 and answer.json()["field"] == field, answer.body


def test_bodies_must_be_json_so_browsers_cannot_forge_them(bridge):
    forged = curl(bridge, "/jobs/submit", "-X", "POST", "-H", "Content-Type: text/plain",
                  "-d", '{"vm_identifier": "vm-1", "provider": "vsphere"}')
    assert forged.status == 415 and forged.json()["field"] == "body"


def test_long_logs_come_in_pages_without_loss(bridge, system_bus):
    from ..support.cli import submit

    reply = submit(system_bus.address, {"lines": 2500}, kind="logflood")
    job_id = json.loads(reply.stdout.split()[1]).rsplit("/", 1)[-1].replace("_", "-")
    wait_status(bridge, job_id, {"completed"})
    lines = curl(bridge, f"/jobs/logs/{job_id}").body.splitlines()
    flood = [line.split(" ", 2)[2].strip() for line in lines if " line " in line]
    assert flood == [f"line {i}" for i in range(2500)]


def test_pathological_json_is_a_400_not_a_crash(bridge):
    for body in ("[" * 50_000 + "]" * 50_000, '{"n": ' + "9" * 5000 + "}",
                 '{"a": ' * 3000 + "1" + "}" * 3000):
        answer = post_json(bridge, "/convert", body)
        assert answer.status == 400 and answer.json()["field"] == "body", answer.body[:200]


def test_odd_methods_are_json_405_counted_together(bridge):
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        answer = curl(bridge, "/jobs", "-X", method)
        assert answer.status == 405 and answer.json()["error"] == "MethodNotAllowed"
    text = curl(bridge, "/metrics").body
    assert "PROPFIND" not in text
    assert 'method="OTHER",route="(unmatched)",status="405"} 3' in text
