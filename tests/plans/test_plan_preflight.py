"""A plan's preflight through a real hypervisord: each rule fails on its own, naming the VM
and the rule; a plan that fails it does not start; bad plan JSON is refused naming the
field."""
from __future__ import annotations

import json

import pytest
from pyVim.connect import Disconnect
from pyVmomi import vim

from tests.support.cli import run_hyperctl
from tests.vcsim.harness import find_vm, wait_task

from .conftest import create_plan, daemon_overrides, hyperctl_json, stored_job_count

pytestmark = pytest.mark.slow


def _failures(address: str, plan_id: str) -> list[tuple[str, str, str]]:
    """(VM, rule, message) of every failing check; hyperctl exits 1 when there is one."""
    report = hyperctl_json(address, "plan", "preflight", plan_id, expect=1)
    assert report["ok"] is False
    return [(entry["name"] or entry["vm"], check["rule"], check["message"])
            for entry in report["vms"] for check in entry["checks"] if not check["ok"]]


def test_each_preflight_rule_names_the_vm_and_the_rule(system_bus, start_hypervisord,
                                                       plan_sim, targets, small_disk,
                                                       service_dir):
    start_hypervisord(**daemon_overrides(
        plan_sim.sim, targets.uri,
        **{"vsphere-bad": plan_sim.sim.provider_settings(password="wrong")}))
    address = system_bus.address
    (a, b), (c, _d) = plan_sim.placed[8], plan_sim.placed[9]  # a, b: LocalDS_0; c: LocalDS_1
    good_storage = {"*": {"directory": str(targets.dirs[0])}}
    counter = iter(range(100))

    def failures(vms: list[str], **changes) -> list[tuple[str, str, str]]:
        definition = {"name": f"pre-{targets.network}-{next(counter)}", "provider": "vsphere",
                      "vms": vms, "network_map": targets.network_map(),
                      "storage_map": good_storage, **changes}
        return _failures(address, create_plan(address, definition))

    def only(found, vm: str, rule: str, *words: str) -> None:
        assert [(name, check) for name, check, _ in found] == [(vm, rule)], found
        assert all(word in found[0][2] for word in words), found

    only(failures(["no-such-vm"]), "no-such-vm", "found", "no-such-vm")
    only(failures([a["name"]], provider="vsphere-bad"), a["name"], "credentials",
         "vsphere-bad")
    only(failures([a["name"]], network_map={}), a["name"], "networks", "DC0_DVPG0",
         "network_map")
    only(failures([a["name"]], network_map={"DC0_DVPG0": {"network": "hsdk-no-such-net"}}),
         a["name"], "networks", "hsdk-no-such-net", "does not exist")
    only(failures([a["name"]], network_map={"DC0_DVPG0": {"bridge": "hsdknobr0"}}),
         a["name"], "networks", "hsdknobr0", "does not exist")
    only(failures([a["name"]], storage_map={"LocalDS_1": good_storage["*"]}), a["name"],
         "storage", "LocalDS_0", "storage_map")
    missing = str(targets.dirs[0] / "missing")
    only(failures([a["name"]], storage_map={"*": {"directory": missing}}), a["name"],
         "storage", missing, "does not exist")
    # 3 MiB disks and a 4 MiB file system: the first VM fits, the second no longer does
    only(failures([a["name"], b["name"]], storage_map={"*": {"directory": str(small_disk)}}),
         b["name"], "space", str(small_disk))

    targets.conn.defineXML(f"<domain type='qemu'><name>{a['name']}</name><memory>16384"
                           "</memory><os><type>hvm</type></os></domain>")
    try:
        only(failures([a["name"]]), a["name"], "name_free", "exists")
    finally:
        targets.conn.lookupByName(a["name"]).undefine()

    si = plan_sim.sim.connect()
    try:
        wait_task(find_vm(si, c["name"]).ReconfigVM_Task(spec=vim.vm.ConfigSpec(
            guestId="otherGuest")))
    finally:
        Disconnect(si)
    plan_id = create_plan(address, {"name": f"pre-{targets.network}-os", "provider": "vsphere",
                                    "vms": [a["name"], c["name"]],
                                    "network_map": targets.network_map(),
                                    "storage_map": good_storage})
    only(_failures(address, plan_id), c["name"], "guest_os", "otherGuest")

    started = run_hyperctl(address, "plan", "start", plan_id)
    assert started.returncode == 1
    assert "preflight failed, nothing was started" in started.stderr
    assert f"{c['name']}: guest_os" in started.stderr
    shown = hyperctl_json(address, "plan", "show", plan_id)
    assert shown["status"] == "created" and shown["vms"] == []
    assert stored_job_count(service_dir / "state" / "hypersdk.db") == 0


@pytest.mark.parametrize("change, message", [
    ({"precopy_interval": 60}, "precopy_interval: needs warm: true"),
    ({"storage_map": {"*": {"directory": "/etc"}}},
     "storage_map.*.directory: '/etc' is outside the paths.outputs roots"),
    ({"limits": {"per_plan": "3"}}, "limits.per_plan: an integer"),
    ({"vms": ["x"], "filter": {"name": "x*"}}, "vms: give the VMs either"),
])
def test_bad_plan_json_is_refused_naming_the_field(system_bus, hypervisord, change, message):
    definition = {"name": "bad", "provider": "ova", "vms": ["x"],
                  "storage_map": {"*": {"directory": "/var/lib/libvirt/images"}}, **change}
    result = run_hyperctl(system_bus.address, "plan", "create", "-",
                          stdin=json.dumps(definition))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_plan_by_discovery_filter(system_bus, start_hypervisord, plan_sim, targets):
    start_hypervisord(**daemon_overrides(plan_sim.sim, targets.uri))
    address = system_bus.address
    wanted = plan_sim.placed[8]
    prefix = wanted[0]["name"].rsplit("-", 2)[0]
    base = {"provider": "vsphere", "network_map": targets.network_map(),
            "storage_map": {"*": {"directory": str(targets.dirs[0])}}}
    matching = create_plan(address, {**base, "name": "by-filter",
                                     "filter": {"name": f"{prefix}-8-*"}})
    report = hyperctl_json(address, "plan", "preflight", matching)
    assert report["ok"] is True
    assert sorted(entry["name"] for entry in report["vms"]) == sorted(vm["name"] for vm in wanted)
    nothing = create_plan(address, {**base, "name": "by-empty-filter",
                                    "filter": {"name": "no-such-*"}})
    report = hyperctl_json(address, "plan", "preflight", nothing, expect=1)
    assert report == {**report, "ok": False, "vms": [],
                      "problem": "the plan's filter matches no VM"}
    bad_key = run_hyperctl(address, "plan", "preflight",
                           create_plan(address, {**base, "name": "bad-filter",
                                                 "filter": {"colour": "red"}}))
    assert bad_key.returncode == 2 and "filter.colour" in bad_key.stderr
