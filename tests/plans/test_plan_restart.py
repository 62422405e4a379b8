"""hypervisord stopped (SIGTERM) or killed (SIGKILL) while a plan runs: after the next
start the plan carries on releasing its VMs, and a VM whose job was interrupted is
migrated by a new job."""
from __future__ import annotations

import signal
import time

import pytest

from hypersdk.client.names import plan_path
from tests.support.cli import BusMonitor, run_hyperctl

from .conftest import create_plan, daemon_overrides, hyperctl_json, job_times

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig, error", [(signal.SIGTERM, "interrupted by service shutdown"),
                                        (signal.SIGKILL, "interrupted: hypervisord stopped")])
def test_a_plan_continues_after_hypervisord_restarts(system_bus, start_hypervisord, service_dir,
                                                     plan_sim, targets, sig, error):
    overrides = daemon_overrides(plan_sim.sim, targets.uri)
    daemon = start_hypervisord(**overrides)
    vms = plan_sim.group([6, 7] if sig == signal.SIGTERM else [8, 9])
    address = system_bus.address
    plan_id = create_plan(address, {
        "name": f"restart-{sig.name}-{targets.network}", "provider": "vsphere",
        "vms": [vm["name"] for vm in vms], "network_map": targets.network_map(),
        "storage_map": {"*": {"directory": str(targets.dirs[0])}},
        "limits": {"per_plan": 1}})
    with BusMonitor(address) as monitor:
        assert run_hyperctl(address, "plan", "start", plan_id).returncode == 0
        # one VM at a time, each a job of its own: four cannot be done before the stop
        assert daemon.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        restarted_at = time.time()
        start_hypervisord(**overrides)
        monitor.wait_for_line(plan_path(plan_id), "'Status': <'completed'>", timeout=300)

    report = hyperctl_json(address, "plan", "report", plan_id)
    assert report["status"] == "completed" and report["moved"] == 4
    lines = report["vms"]
    interrupted = [job for line in lines for job in line.get("interrupted_jobs", [])]
    database = service_dir / "state" / "hypersdk.db"
    finals = job_times(database, [line["job_id"] for line in lines])
    assert all(error == "" for _, _, error in finals.values())
    assert sum(started > restarted_at for started, _, _ in finals.values()) >= 2
    # the first VM's job was running when the stop came (it takes far longer than the
    # few milliseconds between Start's answer and the signal)
    (stopped,) = job_times(database, interrupted).values()
    assert stopped[2].startswith(error)
    for vm in vms:
        assert targets.conn.lookupByName(vm["name"]).name() == vm["name"]
