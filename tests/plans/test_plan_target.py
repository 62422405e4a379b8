"""A plan whose storage map names a target: the VMs' disks are uploaded into the target's
storage pool over qemu+ssh:// (a real sshd on loopback, the real libvirtd behind it) and
their domains defined there; a second plan of the same VMs then fails its preflight,
naming the domains and volumes already at the target. Boots are not verified (the
simulator's disks hold test data, not an OS)."""
from __future__ import annotations

import pytest
from lxml import etree

from hypersdk.client.names import plan_path
from tests.support.cli import BusMonitor, run_hyperctl
from tests.support.targets import dir_pool, volume_names

from .conftest import create_plan, daemon_overrides, hyperctl_json

pytestmark = pytest.mark.slow


def test_a_plan_lands_its_vms_in_a_target_pool_and_a_second_one_fails_preflight(
        system_bus, start_hypervisord, plan_sim, targets, loopback_sshd, local_libvirt):
    vms = plan_sim.group([0, 1])
    address = system_bus.address
    with dir_pool(local_libvirt) as pool:
        start_hypervisord(**daemon_overrides(plan_sim.sim, targets.uri), targets={
            "remote": {"uri": loopback_sshd.uri(), "pool": pool.name()}})

        def plan(name: str) -> str:
            return create_plan(address, {
                "name": f"{name}-{targets.network}", "provider": "vsphere",
                "vms": [vm["name"] for vm in vms], "network_map": targets.network_map(),
                "storage_map": {"*": {"target": "remote"}}, "limits": {"per_plan": 2}})

        first = plan("to-target")
        assert hyperctl_json(address, "plan", "preflight", first)["ok"]
        with BusMonitor(address) as monitor:
            assert run_hyperctl(address, "plan", "start", first).returncode == 0
            monitor.wait_for_line(plan_path(first), "'Status': <'completed'>", timeout=600)
        report = hyperctl_json(address, "plan", "report", first)
        assert report["moved"] == 4
        volumes = sorted(f"{vm['name']}-disk0.qcow2" for vm in vms)
        assert volume_names(pool) == volumes
        for line in report["vms"]:
            assert line["target"] == "remote" and line["verification"] == "not requested"
            (disk,) = line["disks"]
            domain_xml = local_libvirt.lookupByName(line["name"]).XMLDesc(0)
            assert disk.startswith(_pool_path(pool) + "/")
            assert f"pool='{pool.name()}' volume='{disk.rsplit('/', 1)[1]}'" in domain_xml

        second = hyperctl_json(address, "plan", "preflight", plan("again"), expect=1)
        assert not second["ok"]
        for entry in second["vms"]:
            problems = {check["rule"]: check["message"] for check in entry["checks"]
                        if not check["ok"]}
            assert problems.keys() == {"name_free", "storage"}, problems
            assert f"a domain named {entry['name']!r} exists at qemu+ssh://" \
                in problems["name_free"]
            assert f"a volume named '{entry['name']}-disk0.qcow2' already exists" \
                in problems["storage"]


def _pool_path(pool) -> str:
    return etree.fromstring(pool.XMLDesc(0).encode()).findtext("target/path")
