"""hyperctl subcommands as a script runs them: a subprocess on the private bus."""
from __future__ import annotations

import json
import os
import subprocess

from hypersdk.client.names import job_path

from ..support.cli import HYPERCTL, BusMonitor, interfaces_removed
from .conftest import submit_job, wait_status


def test_jobs_json_lists_jobs_and_filters_by_status(system_bus, hypervisord, hyperctl):
    done = submit_job(system_bus.address, {"steps": 1, "interval": 0.01}, "sleep")
    failed = submit_job(system_bus.address, {"message": "boom"}, "fail")
    wait_status(system_bus.address, done, {"completed"})
    wait_status(system_bus.address, failed, {"failed"})

    result = hyperctl("jobs", "--json")
    assert result.returncode == 0, result.stderr
    jobs = {job["id"]: job for job in json.loads(result.stdout)}
    assert jobs[done]["status"] == "completed" and jobs[done]["progress"] == 1.0
    assert jobs[done]["result"] == {"steps": 1}
    assert jobs[failed]["status"] == "failed" and jobs[failed]["error"] == "boom"

    only_failed = json.loads(hyperctl("jobs", "--status", "failed", "--json").stdout)
    assert [job["id"] for job in only_failed] == [failed]

    human = hyperctl("jobs")
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "OPERATION"]
    assert done in human.stdout and failed in human.stdout


def test_jobs_rejects_an_unknown_status(hypervisord, hyperctl):
    result = hyperctl("jobs", "--status", "exploded")
    assert result.returncode == 2
    assert "--status" in result.stderr and "exploded" in result.stderr


def test_submit_from_stdin_then_watch_exits_0(system_bus, hypervisord, hyperctl):
    result = hyperctl("submit", "-", "--kind", "sleep", "--json",
                      stdin=json.dumps({"steps": 5, "interval": 0.1}))
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    assert job_id.startswith("job-")

    watched = hyperctl("watch", job_id)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[-1] == f"{job_id} completed"
    assert any("100%" in line for line in lines)


def test_watch_a_failing_job_exits_1_and_prints_the_error(system_bus, hypervisord, hyperctl):
    job_id = submit_job(system_bus.address, {"message": "disk 2 exploded"}, "fail")
    result = hyperctl("watch", job_id)
    assert result.returncode == 1
    assert f"{job_id} failed: disk 2 exploded" in result.stderr


def test_submit_rejects_bad_files_naming_them(tmp_path, hypervisord, hyperctl):
    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": 1,,}')
    result = hyperctl("submit", str(broken), "--kind", "sleep")
    assert result.returncode == 2
    assert str(broken) in result.stderr and "malformed JSON" in result.stderr and "line 1" in result.stderr

    missing = hyperctl("submit", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json: cannot read" in missing.stderr

    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    assert "must be a JSON object" in hyperctl("submit", str(array)).stderr


def test_submit_an_invalid_definition_names_the_field(tmp_path, hypervisord, hyperctl):
    definition = tmp_path / "job.json"
    definition.write_text(json.dumps({"steps": 1, "bogus": True}))
    result = hyperctl("submit", str(definition), "--kind", "sleep")
    assert result.returncode == 2
    assert "bogus: unknown field" in result.stderr
    assert "Traceback" not in result.stderr


def test_logs_follow_prints_lines_until_the_job_ends(system_bus, hypervisord, hyperctl):
    job_id = submit_job(system_bus.address, {"steps": 5, "interval": 0.2}, "sleep")
    result = hyperctl("logs", "-f", job_id)
    assert result.returncode == 0, result.stderr
    messages = [line.split(None, 2)[2] for line in result.stdout.splitlines()]
    steps = [m for m in messages if m.startswith("step ")]
    assert steps == [f"step {i}" for i in range(1, 6)]

    again = hyperctl("logs", job_id)
    assert again.stdout == result.stdout


def test_cancel_then_watch_reports_cancelled(system_bus, hypervisord, hyperctl):
    job_id = submit_job(system_bus.address, {"steps": 200, "interval": 0.1}, "sleep")
    wait_status(system_bus.address, job_id, {"running"})
    result = hyperctl("cancel", job_id)
    assert result.returncode == 0, result.stderr
    assert wait_status(system_bus.address, job_id, {"cancelled"}) == "cancelled"
    watched = hyperctl("watch", job_id)
    assert watched.returncode == 1
    assert f"{job_id} cancelled" in watched.stderr


def test_unknown_job_is_reported(hypervisord, hyperctl):
    result = hyperctl("watch", "job-doesnotexist")
    assert result.returncode == 1
    assert "no job 'job-doesnotexist'" in result.stderr


def test_service_not_running_exits_69(system_bus, hyperctl):
    result = hyperctl("jobs")
    assert result.returncode == 69
    assert "hypervisord is not running" in result.stderr


def test_unreachable_bus_exits_69(tmp_path, hyperctl):
    result = hyperctl("--bus", f"unix:path={tmp_path}/no-such-socket", "jobs")
    assert result.returncode == 69
    assert "cannot connect" in result.stderr


def test_logs_follow_a_flood_gets_every_line_once_in_order(system_bus, hypervisord, hyperctl):
    """A burst of LogLine signals (the service never yields) arrives whole and in order."""
    job_id = submit_job(system_bus.address, {"lines": 3000, "padding": 100}, "logflood")
    result = hyperctl("logs", "-f", job_id)
    assert result.returncode == 0, result.stderr
    messages = [line.split(None, 2)[2] for line in result.stdout.splitlines()]
    flood = [m.split()[1] for m in messages if m.startswith("line ")]
    assert len(flood) == 3000
    assert flood == [str(i) for i in range(3000)]


def test_vms_reports_a_broken_provider_and_lists_the_others(start_hypervisord, hyperctl):
    dead = {"type": "vsphere", "host": "127.0.0.1", "port": 1, "username": "admin",
            "password": "s3cret-pw", "insecure": True, "protocol": "https"}
    start_hypervisord(providers={"deadsphere": dead})
    result = hyperctl("vms", timeout=120)
    assert result.returncode == 1
    assert "hyperctl: deadsphere: " in result.stderr
    assert result.stdout.startswith("NAME")
    only = hyperctl("vms", "--provider", "deadsphere", "--json", timeout=120)
    assert only.returncode == 1 and only.stdout == ""
    assert only.stderr.startswith("hyperctl: ") and "Traceback" not in only.stderr
    assert "s3cret-pw" not in result.stderr + only.stderr


def test_submit_watch_exit_code_is_the_jobs(tmp_path, hypervisord, hyperctl):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"steps": 3, "interval": 0.05}))
    result = hyperctl("submit", str(ok), "--kind", "sleep", "--watch")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[1]
    assert result.stdout.splitlines()[-1] == f"{job_id} completed"

    failing = tmp_path / "fail.json"
    failing.write_text(json.dumps({"message": "quota exceeded"}))
    result = hyperctl("submit", str(failing), "--kind", "fail", "--watch")
    assert result.returncode == 1
    assert "failed: quota exceeded" in result.stderr


def test_watch_on_a_terminal_redraws_one_line(system_bus, hypervisord):
    """Under a pseudo-terminal (util-linux `script`) the bar is redrawn in place."""
    job_id = submit_job(system_bus.address, {"steps": 4, "interval": 0.1}, "sleep")
    command = f"{HYPERCTL} watch {job_id}"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                            timeout=60,
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": system_bus.address})
    output = result.stdout.decode()
    assert result.returncode == 0, output
    assert output.count("\r\x1b[K") >= 2 and "100%" in output
    assert output.rstrip().endswith(f"{job_id} completed")



def test_a_boot_verification_is_found_in_import_and_export_results():
    from hypersdk.tui.format import boot_verification

    verification = {"verified": True, "method": "console", "at": "2026-12-07T05:40:12Z",
                    "seen": ["Debian GNU/Linux 12 hypersdk-guest ttyS0", "hypersdk-guest login:"]}
    shown = "console at 2026-12-07T05:40:12Z: hypersdk-guest login:"
    assert boot_verification({"domain": "vm", "verification": verification}) == shown
    assert boot_verification({"hyper2kvm": {"mode": "builtin",
                                            "import": {"verification": verification}}}) == shown
    assert boot_verification({"hyper2kvm": {"mode": "export-only"}}) == ""
    assert boot_verification("") == ""


def test_jobs_that_left_the_bus_are_listed_watched_and_logged(
        system_bus, start_hypervisord, hyperctl):
    """With finished_job_linger 0 a finished job is only in the store: hyperctl still
    lists it, shows its end, prints its log, and refuses to cancel it saying why."""
    start_hypervisord(daemon={"finished_job_linger": 0})
    with BusMonitor(system_bus.address) as monitor:
        job_id = submit_job(system_bus.address, {"steps": 2, "interval": 0.01}, "sleep")
        monitor.wait_for(interfaces_removed(job_path(job_id)))

    listed = json.loads(hyperctl("jobs", "--json").stdout)
    assert [(job["id"], job["status"]) for job in listed] == [(job_id, "completed")]
    watched = hyperctl("watch", job_id)
    assert watched.returncode == 0 and watched.stdout.splitlines()[-1] == f"{job_id} completed"
    logged = hyperctl("logs", job_id)
    assert logged.returncode == 0, logged.stderr
    assert [line.split(None, 2)[1:] for line in logged.stdout.splitlines()] == \
        [["info", "step 1"], ["info", "step 2"]]
    refused = hyperctl("cancel", job_id)
    assert refused.returncode != 0 and "completed" in refused.stderr, refused.stderr
    unknown = hyperctl("logs", "job-000000000bad")
    assert unknown.returncode != 0 and "job-000000000bad" in unknown.stderr
