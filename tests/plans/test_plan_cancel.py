"""Cancelling a running plan: no VM is released after it, the running job is cancelled
(or has ended), the plan ends "cancelled" with its report; the live Plan interface is the
documented one."""
from __future__ import annotations

import pytest

from hypersdk.client.names import PLAN_IFACE, plan_path
from tests.support.cli import BusMonitor, run_hyperctl
from tests.support.introspection import documented, live

from .conftest import create_plan, daemon_overrides, hyperctl_json, stored_job_count

pytestmark = pytest.mark.slow


def test_cancel_stops_releasing_and_cancels_the_running_job(system_bus, start_hypervisord,
                                                            service_dir, plan_sim, targets):
    start_hypervisord(**daemon_overrides(plan_sim.sim, targets.uri))
    vms = plan_sim.group([6, 7])
    address = system_bus.address
    plan_id = create_plan(address, {
        "name": f"cancel-{targets.network}", "provider": "vsphere",
        "vms": [vm["name"] for vm in vms], "network_map": targets.network_map(),
        "storage_map": {"*": {"directory": str(targets.dirs[0])}},
        "limits": {"per_plan": 1}})
    assert live(address, plan_path(plan_id), PLAN_IFACE) == documented(PLAN_IFACE)
    with BusMonitor(address) as monitor:
        assert run_hyperctl(address, "plan", "start", plan_id).returncode == 0
        cancelled = run_hyperctl(address, "plan", "cancel", plan_id)
        assert cancelled.returncode == 0, cancelled.stderr
        monitor.wait_for_line(plan_path(plan_id), "'EndTime': <uint64 ", timeout=120)

    report = hyperctl_json(address, "plan", "report", plan_id)
    assert report["status"] == "cancelled" and report["final"]
    states = [line["state"] for line in report["vms"]]
    assert states[0] in ("cancelled", "completed") and states[1:] == ["cancelled"] * 3
    assert all(line["error"] == "the plan was cancelled" for line in report["vms"][1:])
    assert stored_job_count(service_dir / "state" / "hypersdk.db") == 1
    listed = run_hyperctl(address, "plan", "list").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "STATUS", "PROVIDER", "VMS"]
    assert listed[1].split() == [plan_id, f"cancel-{targets.network}", "cancelled", "vsphere",
                                 "4"]
    again = run_hyperctl(address, "plan", "cancel", plan_id)
    assert again.returncode == 2 and "has already cancelled" in again.stderr
