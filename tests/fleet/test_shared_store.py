"""Two real hypervisords on two private buses sharing one real PostgreSQL database
(service/fleet.py): jobs claimed once, a dead instance's jobs recovered by the other,
cancels across instances, schedules fired once, and each instance showing the fleet."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter

from aiohttp import web

from hypersdk.client.names import job_path
from hypersdk.service.engine import new_job_id
from hypersdk.service.store import JobRecord, open_store
from tests.support.cli import BUS_NAME, MANAGER, MANAGER_IFACE, busctl, wait_for_status
from tests.support.fleet import Fleet, tally_job
from tests.support.servers import serve_app
from tests.support.wait import until, wait_for_value, wait_until

from ..bridge.stack import ANY_PORT, Bridge, curl, token_api, wait_status


def _statuses(fleet: Fleet, ids: list[str]) -> Counter:
    jobs = {job.id: job.status for job in fleet.jobs()}
    return Counter(jobs[job_id] for job_id in ids)


def test_forty_jobs_split_across_two_instances_each_run_exactly_once(fleet):
    a, b = fleet.start("a"), fleet.start("b")
    ids = [(a if number % 2 else b).submit("tally", tally_job(fleet, steps=3))
           for number in range(40)]
    wait_for_value(lambda: _statuses(fleet, ids), lambda seen: seen["completed"] == 40,
                   timeout=90, what="40 jobs completed")
    runs = fleet.tally()
    assert sorted(job_id for job_id, _ in runs) == sorted(ids)  # each once, none twice
    by_instance = Counter(instance for _, instance in runs)
    assert set(by_instance) == {"a", "b"} and min(by_instance.values()) > 0, by_instance
    recorded = {job.id: job.instance for job in fleet.jobs()}
    assert all(recorded[job_id] == instance for job_id, instance in runs)  # the record agrees
    # each instance's bus answers for every job, whoever ran it
    for job_id, instance in runs[:6]:
        for other in (a, b):
            record = other.get_job(job_id)
            assert (record["Status"], record["Instance"]) == ("completed", instance)


def test_a_killed_instance_s_jobs_are_recovered_by_the_other_and_its_restart_leaves_them(
        fleet):
    a, b = fleet.start("a"), fleet.start("b")
    definition = {"dir": str(fleet.shared), "steps": 60, "interval": 0.05, "step_bytes": 1}
    ids = [a.submit("sleep", definition) for _ in range(2)]
    for job_id in ids:
        wait_for_status(a.address, job_path(job_id), {"running"})
    on_a = [job_id for job_id in ids if a.get_job(job_id)["Instance"] == "a"]
    assert on_a, "a submit on a starts on a at once"
    for job_id in on_a:
        assert (fleet.shared / f"{job_id}.partial").exists()
        wait_until(lambda: job_path(job_id) in b.list_jobs(), what="a's job on b's bus")

    a.daemon.kill()  # kill -9: no lease renewed, nothing cleaned up
    for job_id in on_a:
        wait_for_status(b.address, job_path(job_id), {"failed"}, timeout=30)
    story = {job_id: b.get_job(job_id) for job_id in on_a}
    retries = {}
    for job_id, record in story.items():
        assert record["Error"].startswith("interrupted: instance a stopped answering (last "
                                          "heartbeat "), record["Error"]
        assert "instance b recovered the job and runs it again as job-" in record["Error"]
        retries[job_id] = record["Error"].rsplit(" as ", 1)[1]
        assert (fleet.shared / f"{job_id}.partial").exists()  # on a's disk: b cannot know
    for old, retry in retries.items():
        wait_for_status(b.address, job_path(retry), {"completed"}, timeout=30)
        record = b.get_job(retry)
        assert (record["Instance"], record["RetryOf"]) == ("b", old)
    history = fleet.read(lambda store: store.status_history(on_a[0]))
    recovered_by = {job.id: job.recovered_by for job in fleet.jobs() if job.id in on_a}
    assert [entry[1:] for entry in history[-2:]] == [
        ("running", "claimed"), ("failed", "recovered by b: a stopped answering")]
    assert set(recovered_by.values()) == {"b"}

    a.restart()
    for job_id in on_a:  # its restart removes what the job made on its disk ...
        wait_until(lambda: not (fleet.shared / f"{job_id}.partial").exists(),
                   what=f"{job_id}.partial removed by a's restart")
        # ... and leaves the record as b wrote it
        assert a.get_job(job_id) == story[job_id]
        assert a.get_job(retries[job_id])["Status"] == "completed"
        assert (fleet.shared / f"{retries[job_id]}.partial").exists()


def test_a_cancel_sent_to_one_instance_ends_a_job_running_on_the_other(fleet):
    a, b = fleet.start("a"), fleet.start("b")
    job_id = b.submit("sleep", {"steps": 1000, "interval": 0.05, "step_bytes": 1})
    wait_for_status(b.address, job_path(job_id), {"running"})
    runner = b.get_job(job_id)["Instance"]
    other = a if runner == "b" else b
    wait_until(lambda: job_path(job_id) in other.list_jobs(),
               what="the job on the other instance's bus")
    other.cancel(job_id)
    for instance in (a, b):
        wait_for_status(instance.address, job_path(job_id), {"cancelled"})
    record = other.get_job(job_id)
    assert record["Error"] == f"cancelled by the user on instance {other.name}"
    assert record["Instance"] == runner


def test_a_schedule_due_on_both_instances_fires_exactly_once_per_slot(fleet):
    a = fleet.start("a")
    schedule = {"name": "often", "cron": "* * * * * */2", "kind": "tally",
                "job_definition": tally_job(fleet)}
    busctl(a.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "CreateSchedule", "sa{sv}",
           json.dumps(schedule), "0")
    fleet.start("b")  # reads the schedule at its start: both tick it from now on

    def fired():
        return fleet.read(lambda store: store.execute(
            "SELECT slot, job_id FROM schedule_jobs")).fetchall()

    rows = wait_for_value(fired, lambda rows: len(rows) >= 4, timeout=40,
                          what="four slots fired")
    slots = Counter(row[0] for row in rows)
    assert max(slots.values()) == 1, slots  # no slot fired twice
    ids = [row[1] for row in rows]
    wait_for_value(lambda: _statuses(fleet, ids), lambda seen: seen["completed"] == len(ids),
                   what="the scheduled jobs completed")
    runs = [job_id for job_id, _ in fleet.tally() if job_id in ids]
    assert sorted(runs) == sorted(ids)
    for name in ("a", "b"):
        assert "scheduler tick failed" not in fleet.instances[name].daemon.log()


def test_one_instance_s_bridge_shows_a_job_running_on_the_other_with_its_progress(fleet):
    b = fleet.start("b")
    job_id = b.submit("sleep", {"steps": 1000, "interval": 0.05, "step_bytes": 1})
    wait_for_status(b.address, job_path(job_id), {"running"})  # on b: no other instance yet
    home = fleet.directory / "a"  # the bridge's curl config sits beside a's config
    home.mkdir()
    a = fleet.start("a", daemon={"address": ANY_PORT}, api=token_api(home))
    bridge = Bridge(a.daemon.config_path, a.address).start()
    try:
        shown = wait_for_value(lambda: curl(bridge, f"/jobs/query?job_id={job_id}").json(),
                               lambda job: job["bytes_done"] > 0, what="b's saved progress")
        wait_for_value(lambda: curl(bridge, f"/jobs/query?job_id={job_id}").json(),
                       lambda job: job["bytes_done"] > shown["bytes_done"],
                       what="b's progress moving on a's bridge")
        assert (shown["status"], shown["instance"], shown["stage"]) == ("running", "b",
                                                                          "sleeping")
        listed = curl(bridge, "/jobs?status=running").json()["jobs"]
        assert [(job["job_id"], job["instance"]) for job in listed] == [(job_id, "b")]
        b.cancel(job_id)
        assert wait_status(bridge, job_id, {"cancelled"})["instance"] == "b"
    finally:
        bridge.stop()


def test_an_instance_paused_past_its_lease_stops_the_job_the_other_recovered(fleet):
    b = fleet.start("b")
    definition = {"dir": str(fleet.shared), "steps": 400, "interval": 0.05, "step_bytes": 1}
    job_id = b.submit("sleep", definition)
    wait_for_status(b.address, job_path(job_id), {"running"})  # on b: no other instance yet
    a = fleet.start("a")
    wait_until(lambda: job_path(job_id) in a.list_jobs(), what="b's job on a's bus")
    b.daemon.process.send_signal(signal.SIGSTOP)  # alive, but silent: a cut-off host
    try:
        wait_for_status(a.address, job_path(job_id), {"failed"}, timeout=30)
    finally:
        b.daemon.process.send_signal(signal.SIGCONT)
    recovered = a.get_job(job_id)
    assert recovered["Error"].startswith("interrupted: instance b stopped answering")
    # b stops the job there and removes what it made, and a's record stands: its lease
    # ran out unrenewed while it was paused (or, had it been cut off for less than the
    # timer's lateness, it hears at its next heartbeat that a recovered the job)
    wait_until(lambda: not (fleet.shared / f"{job_id}.partial").exists(),
               what="b to remove what its lost run made")
    wait_until(lambda: f"job {job_id}: " in b.daemon.log()
               and "stopped here, what it made here is removed" in b.daemon.log(),
               what="b to stop its lost run")
    assert a.get_job(job_id) == recovered
    assert b.get_job(job_id) == recovered


async def test_each_webhook_event_is_delivered_once_by_the_fleet(fleet):
    arrived: list[tuple[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        arrived.append((body["event"], body["job_id"]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve_app(app)
    try:
        settings = {"automation": {"webhook_private_targets": ["127.0.0.1"]},
                    "webhooks": [{"url": f"http://127.0.0.1:{port}/hook",
                                  "events": ["job.started", "job.completed"]}]}
        a = await asyncio.to_thread(fleet.start, "a", **settings)
        b = await asyncio.to_thread(fleet.start, "b", **settings)
        ids = [await asyncio.to_thread((a if n % 2 else b).submit, "tally", tally_job(fleet))
               for n in range(10)]
        expected = sorted((event, job_id) for job_id in ids
                          for event in ("job.started", "job.completed"))
        await until(lambda: len(arrived) >= len(expected), timeout=60,
                    what="every job's two events")
        await until(lambda: _outbox_settled(fleet), what="the outbox to drain")
        assert sorted(arrived) == expected  # each once, none twice
    finally:
        await runner.cleanup()


async def _outbox_settled(fleet: Fleet) -> bool:
    store = await open_store(fleet.url)
    try:
        return (await store.execute("SELECT COUNT(*) FROM webhook_outbox"
                                    " WHERE state != 'delivered'")).fetchone()[0] == 0
    finally:
        await store.close()


def test_a_job_naming_paths_outside_this_instance_s_roots_is_refused_when_claimed(fleet,
                                                                                  tmp_path):
    """A job stored by an instance with other roots (here written into the shared store
    as that instance would) is claimed by b, which confines paths to its OWN roots: the
    job fails naming the field, and nothing is written."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "disk.raw").write_bytes(b"\0" * 4096)
    record = JobRecord(id=new_job_id(), kind="convert", status="pending", created_at=time.time(),
                       definition={"source_path": str(elsewhere / "disk.raw"),
                                   "output_path": str(elsewhere / "out"),
                                   "conversion_options": {"format": "qcow2",
                                                          "compression": False,
                                                          "source_format": "raw"}})
    fleet.read(lambda store: store.insert_job(record))
    b = fleet.start("b")  # its roots: its own directory, not tmp_path/elsewhere
    status = wait_for_status(b.address, job_path(record.id), {"completed", "failed"})
    assert status == "failed"
    (job,) = [job for job in fleet.jobs() if job.id == record.id]
    assert job.error.startswith("instance b cannot run the job: source_path: "), job.error
    assert job.instance == "b" and sorted(p.name for p in elsewhere.iterdir()) == ["disk.raw"]
