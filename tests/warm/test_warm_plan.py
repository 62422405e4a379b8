"""A warm plan over REST through a real bridge and hypervisord, from the vSphere
simulator with its extension (tests/vcsim/cbt.go) into the real libvirtd: pre-copy,
a cutover by POST /plans/{id}/cutover, the report's downtime and rounds; and a warm
job cut over with `hyperctl cutover` (POST /jobs/{id}/cutover refused once it ended)."""
from __future__ import annotations

import json
import uuid

import pytest
from pyVmomi import vim

from tests.bridge.conftest import bridge_account, start_bridge  # noqa: F401 - fixtures
from tests.bridge.stack import curl, post_json
from tests.plans.conftest import Targets, daemon_overrides
from tests.support.cli import BusMonitor, run_hyperctl, submit, wait_for_status
from tests.support.wait import wait_for_value
from tests.vcsim.harness import find_vm, wait_task

from .conftest import WARM_VM
from .test_warm_job import BLOCK, _write

pytestmark = pytest.mark.slow


@pytest.fixture
def linux_vm(si, running_vm):
    """The running VM renamed uniquely (its libvirt domain's name), guest OS Debian."""
    name = f"hsdkwarm-{uuid.uuid4().hex[:6]}"
    wait_task(find_vm(si, WARM_VM).ReconfigVM_Task(
        spec=vim.vm.ConfigSpec(name=name, guestId="debian10_64Guest")))
    return name, running_vm


@pytest.fixture
def libvirt_targets(linux_vm):
    made = Targets()
    yield made
    made.close([linux_vm[0]])


def test_a_warm_plan_cut_over_over_rest_reports_downtime_and_rounds(
        start_bridge, bridge_account, sim, system_bus, linux_vm, libvirt_targets):  # noqa: F811
    name, flat = linux_vm
    bridge = start_bridge(**daemon_overrides(sim, libvirt_targets.uri))
    created = post_json(bridge, "/plans", {
        "name": "warm-plan", "provider": "vsphere", "vms": [name],
        "network_map": libvirt_targets.network_map(),
        "storage_map": {"*": {"directory": str(libvirt_targets.dirs[0])}},
        "warm": True, "precopy_interval": 3600})
    assert created.status == 200, created.body
    plan_id = created.json()["id"]
    not_yet = post_json(bridge, f"/plans/{plan_id}/cutover", {})
    assert not_yet.status == 400 and "is created, not running" in not_yet.body
    with BusMonitor(system_bus.address) as monitor:
        assert post_json(bridge, f"/plans/{plan_id}/start", {}).status == 200
        monitor.wait_for("pre-copy round 1", 120)
        _write(flat, 2 << 20, b"w" * BLOCK)
        cutover = post_json(bridge, f"/plans/{plan_id}/cutover", {})
        assert cutover.status == 200, cutover.body
        assert len(cutover.json()["cutover_jobs"]) == 1
    plan = wait_for_value(lambda: curl(bridge, f"/plans/{plan_id}").json(),
                          lambda plan: plan["status"] in ("completed", "failed"), 120,
                          f"plan {plan_id} to end")
    assert plan["status"] == "completed", plan
    report = curl(bridge, f"/plans/{plan_id}/report").json()
    [line] = report["vms"]
    assert line["domain"] == name and report["warnings"] == []
    assert [(r["bytes"], r["final"]) for r in line["rounds"]] == [(4 << 20, False),
                                                                  (BLOCK, True)]
    assert 0 < line["downtime_seconds"] < line["seconds"]
    again = post_json(bridge, f"/plans/{plan_id}/cutover", {})
    assert again.status == 400 and "not running" in again.body


def test_hyperctl_cutover_of_a_warm_job(start_bridge, bridge_account, sim,  # noqa: F811
                                        system_bus, running_vm):
    bridge = start_bridge(providers={"vsphere": sim.provider_settings()})
    address = system_bus.address
    with BusMonitor(address) as monitor:
        path = json.loads(submit(address, {
            "vm_identifier": WARM_VM, "provider": "vsphere", "export_method": "disk",
            "export_path": "warm-cli", "warm": True}).stdout.split()[1])
        monitor.wait_for("pre-copy round 1", 60)
        job_id = path.rsplit("/", 1)[1].replace("_", "-")
        cut = run_hyperctl(address, "cutover", job_id)
        assert cut.returncode == 0 and cut.stdout == f"cutover requested for {job_id}\n"
    assert wait_for_status(address, path, {"completed", "failed"}, 60) == "completed"
    ended = post_json(bridge, f"/jobs/{job_id}/cutover", {})
    assert ended.status == 400 and "has already completed" in ended.body
    again = run_hyperctl(address, "cutover", job_id)
    assert again.returncode != 0 and "has already completed" in again.stderr
