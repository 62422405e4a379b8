"""Jobs survive crashes, cancel is prompt, retries back off, SIGTERM drains, READY is honest."""
from __future__ import annotations

import json
import signal
import subprocess
import time

from ..support.cli import (BUS_NAME, JOB_IFACE, busctl, busctl_json, job_property, submit,
                           wait_for_status)
from ..support.wait import wait_until


def _submit_path(address: str, definition: dict, kind: str) -> str:
    return json.loads(submit(address, definition, kind=kind).stdout.split()[1])


def test_ready_is_sent_after_the_name_is_owned(system_bus, hypervisord):
    assert any("READY=1" in n for n in hypervisord.notifications)
    owner = busctl(system_bus.address, "status", BUS_NAME, check=False)
    assert owner.returncode == 0  # the name was owned when READY=1 arrived
    assert "hypervisord" in hypervisord.log() and "ready" in hypervisord.log()


def test_cancel_of_a_running_job_ends_it_and_removes_partial_files(
        system_bus, hypervisord, service_dir):
    path = _submit_path(system_bus.address, {"dir": str(service_dir), "steps": 600,
                                             "interval": 0.1}, "sleep")
    wait_for_status(system_bus.address, path, {"running"})
    job_id = job_property(system_bus.address, path, "Id")
    partial = service_dir / f"{job_id}.partial"
    assert partial.exists()
    busctl(system_bus.address, "call", BUS_NAME, path, JOB_IFACE, "Cancel", "a{sv}", "0")
    # the job had a minute to go: cancelled well before it, it was cancelled, not done
    wait_for_status(system_bus.address, path, {"cancelled"}, timeout=20)
    assert not partial.exists()
    assert job_property(system_bus.address, path, "Error") == "cancelled by the user"


def test_a_pending_job_can_be_cancelled(system_bus, start_hypervisord):
    start_hypervisord(daemon={"workers": 1})
    address = system_bus.address
    blocker = _submit_path(address, {"steps": 100, "interval": 0.1}, "sleep")
    waiting = _submit_path(address, {"steps": 1}, "sleep")
    assert job_property(address, waiting, "Status") == "pending"
    busctl(address, "call", BUS_NAME, waiting, JOB_IFACE, "Cancel", "a{sv}", "0")
    assert job_property(address, waiting, "Status") == "cancelled"
    busctl(address, "call", BUS_NAME, blocker, JOB_IFACE, "Cancel", "a{sv}", "0")


def test_kill_9_mid_job_then_restart_leaves_every_job_in_a_defined_state(
        system_bus, start_hypervisord, service_dir):
    daemon = start_hypervisord(daemon={"workers": 1})
    address = system_bus.address
    done = _submit_path(address, {"steps": 1, "interval": 0.01}, "sleep")
    wait_for_status(address, done, {"completed"})
    running = _submit_path(address, {"dir": str(service_dir), "steps": 600, "interval": 0.1},
                           "sleep")
    queued = _submit_path(address, {"steps": 2, "interval": 0.01}, "sleep")
    wait_for_status(address, running, {"running"})
    running_id = job_property(address, running, "Id")
    assert (service_dir / f"{running_id}.partial").exists()
    assert list(service_dir.glob(".hypersdk-staging-*"))
    daemon.kill()

    daemon.start()
    assert job_property(address, done, "Status") == "completed"
    assert job_property(address, running, "Status") == "failed"
    assert job_property(address, running, "Error").startswith(
        "interrupted: hypervisord stopped while the job was running; its partial output "
        "was removed")
    # what the killed job had made is gone: its landed file and its staging directory
    assert not (service_dir / f"{running_id}.partial").exists()
    assert not list(service_dir.glob(".hypersdk-staging-*"))
    assert wait_for_status(address, queued, {"completed"}) == "completed"
    lines = busctl_json(address, "call", BUS_NAME, running, JOB_IFACE, "GetLog", "ta{sv}", "0",
                        "0")["data"][0]
    assert lines[-1][2] == "error" and lines[-1][3].startswith("interrupted:")
    # a failed job can be retried as a new job
    retried = json.loads(busctl(address, "call", BUS_NAME, running, JOB_IFACE, "Retry",
                                "a{sv}", "0").stdout.split()[1])
    assert job_property(address, retried, "RetryOf") == job_property(address, running, "Id")


def test_sigterm_drains_and_exits_zero(system_bus, start_hypervisord, service_dir):
    daemon = start_hypervisord()
    address = system_bus.address
    running = _submit_path(address, {"dir": str(service_dir), "steps": 600, "interval": 0.1},
                           "sleep")
    wait_for_status(address, running, {"running"})
    assert daemon.stop(signal.SIGTERM) == 0
    assert not list(service_dir.glob("*.partial"))
    daemon.start()
    assert job_property(address, running, "Status") == "failed"
    assert job_property(address, running, "Error") == (
        "interrupted by service shutdown; its partial output was removed (retry the job)")


def test_retryable_failures_are_retried_with_backoff(system_bus, hypervisord):
    path = _submit_path(system_bus.address, {"succeed_on": 2}, "flaky")
    assert wait_for_status(system_bus.address, path, {"completed", "failed"}) == "completed"
    assert job_property(system_bus.address, path, "Attempts") == 2
    lines = busctl_json(system_bus.address, "call", BUS_NAME, path, JOB_IFACE, "GetLog",
                        "ta{sv}", "0", "0")["data"][0]
    assert any("retrying in 1s" in line[3] for line in lines)


def test_retries_give_up_after_max_retries(system_bus, start_hypervisord):
    start_hypervisord(export={"max_retries": 1})
    path = _submit_path(system_bus.address, {"succeed_on": 5}, "flaky")
    assert wait_for_status(system_bus.address, path, {"completed", "failed"}) == "failed"
    assert "gave up after 2 attempts" in job_property(system_bus.address, path, "Error")


def test_a_failed_job_reports_its_error(system_bus, hypervisord):
    path = _submit_path(system_bus.address, {"message": "disk on fire"}, "fail")
    assert wait_for_status(system_bus.address, path, {"failed"}) == "failed"
    assert job_property(system_bus.address, path, "Error") == "disk on fire"


def test_rate_and_eta_appear_once_there_are_enough_samples(system_bus, hypervisord):
    # 1 MiB every 0.5 s: the third sample, the first estimate, comes 1.5 s after the start
    path = _submit_path(system_bus.address, {"steps": 10, "interval": 0.5}, "sleep")
    wait_for_status(system_bus.address, path, {"running"})
    assert job_property(system_bus.address, path, "Rate") == 0  # no estimate yet
    rate = wait_until(lambda: job_property(system_bus.address, path, "Rate"), 10,
                      "a rate estimate")
    eta = job_property(system_bus.address, path, "ExpectedEndTime")
    assert rate <= 2.1 * (1 << 20)  # at most 1 MiB per 0.5 s; bytes per second
    assert eta / 1e6 > time.time()  # still to come
    assert 0 < job_property(system_bus.address, path, "Progress") < 1


def test_the_service_stays_on_the_bus_through_a_signal_flood(system_bus, hypervisord):
    """20,000 LogLine signals plus progress changes while a client listens, slowly."""
    address = system_bus.address
    listener = subprocess.Popen(["gdbus", "monitor", "--address", address, "--dest", BUS_NAME],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert listener.stdout.readline().startswith("Monitoring signals")  # subscribed; then
        # it reads no more: a slow client
        paths = [_submit_path(address, {"lines": 10000, "padding": 200}, "logflood")
                 for _ in range(2)]
        for path in paths:
            assert wait_for_status(address, path, {"completed", "failed"}, timeout=120) == \
                "completed"
        # still on the bus, still answering
        assert busctl(address, "status", BUS_NAME, check=False).returncode == 0
        assert job_property(address, paths[0], "BytesDone") == 10000
    finally:
        listener.kill()
        listener.wait()
    assert "lost the connection" not in hypervisord.log()
