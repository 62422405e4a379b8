"""A plan on two hypervisords sharing one real PostgreSQL (service/fleet.py): the instance
that started it is killed (SIGKILL) while its VMs' jobs run; the other recovers the jobs,
takes the plan over and finishes it, each VM migrated by exactly one completed job."""
from __future__ import annotations

import signal
from collections import Counter

import pytest

from tests.support.cli import run_hyperctl
from tests.support.fleet import Fleet
from tests.support.wait import wait_for_value

from .conftest import create_plan, daemon_overrides, hyperctl_json

pytestmark = pytest.mark.slow


def _plan_row(fleet: Fleet, plan_id: str) -> tuple[str, str]:
    """(status, instance) of the plan as the shared store holds it."""
    return tuple(fleet.read(lambda store: store.execute(
        "SELECT status, instance FROM plans WHERE id=?", (plan_id,))).fetchone())


def test_a_plan_whose_instance_dies_is_finished_by_another(postgres, tmp_path, plan_sim,
                                                           targets):
    fleet = Fleet(postgres.new_database(), tmp_path)
    try:
        overrides = daemon_overrides(plan_sim.sim, targets.uri)
        # conversion hosts of one fleet share their config: the same roots for both
        roots = [str(tmp_path), "/var/lib/libvirt/images"]
        overrides["export"] = {**overrides["export"], "base_path": str(tmp_path / "exports")}
        overrides["paths"] = {"sources": roots, "outputs": roots}
        a = fleet.start("a", **overrides)
        b = fleet.start("b", **overrides)
        vms = plan_sim.group([0, 1])
        plan_id = create_plan(a.address, {
            "name": f"fleet-{targets.network}", "provider": "vsphere",
            "vms": [vm["name"] for vm in vms], "network_map": targets.network_map(),
            "storage_map": {"*": {"directory": str(targets.dirs[0])}},
            "limits": {"per_plan": 2}})
        assert run_hyperctl(a.address, "plan", "start", plan_id).returncode == 0
        # the first two VMs' jobs were claimed by a at once and run for far longer than
        # the moment between Start's answer and the kill
        assert a.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        assert wait_for_value(lambda: _plan_row(fleet, plan_id),
                              lambda row: row[0] in ("completed", "failed", "cancelled"),
                              timeout=180, what="the plan ending") == ("completed", "b")

        report = hyperctl_json(b.address, "plan", "report", plan_id)
        assert report["moved"] == 4
        exports = [job for job in fleet.jobs() if job.kind == "export"]
        completed = Counter(job.definition["vm_identifier"] for job in exports
                            if job.status == "completed")
        assert completed == Counter(line["vm"] for line in report["vms"])  # once each, none twice
        assert len(completed) == 4
        recovered = [job for job in exports if job.recovered_by == "b"]
        assert recovered and all("instance a stopped answering" in job.error
                                 for job in recovered)
        interrupted = {job for line in report["vms"] for job in line.get("interrupted_jobs", [])}
        assert interrupted == {job.id for job in recovered}
        assert {job.status for job in exports} <= {"completed", "failed"}

        a.restart()  # its recovery removes what its jobs left here, not the plan's
        assert hyperctl_json(a.address, "plan", "report", plan_id)["moved"] == 4
        assert _plan_row(fleet, plan_id) == ("completed", "b")
        for vm in vms:
            assert targets.conn.lookupByName(vm["name"]).name() == vm["name"]
    finally:
        fleet.stop()
