"""A plan of 12 simulator VMs on two hosts, two networks and two datastores migrates into
the real libvirtd through a real hypervisord: its limits hold (concurrency observed from
the store's job times), its network and storage maps are in the domain XML, and its
report says what happened. Boots are not verified (12 TCG guests are too slow for this
2-core host; the simulator's disks hold test data, not an OS): the domains are defined,
not started, and the report says "not requested"."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from lxml import etree

from hypersdk.client.names import plan_path
from tests.support.cli import BusMonitor, run_hyperctl

from .conftest import (daemon_overrides, create_plan, hyperctl_json, job_times, max_overlap,
                       plan_property)

pytestmark = pytest.mark.slow
LIMITS = {"per_plan": 3, "per_host": 2, "per_datastore": 2}


def test_twelve_vms_migrate_within_limits_with_maps_applied_not_boot_verified(
        system_bus, start_hypervisord, service_dir, plan_sim, targets):
    daemon = start_hypervisord(**daemon_overrides(plan_sim.sim, targets.uri))
    vms = plan_sim.group(range(6))
    storage = {"LocalDS_0": {"directory": str(targets.dirs[0])},
               "LocalDS_1": {"directory": str(targets.dirs[1]), "format": "raw"}}
    address = system_bus.address
    plan_id = create_plan(address, {
        "name": f"twelve-{targets.network}", "provider": "vsphere",
        "vms": [vm["name"] for vm in vms], "network_map": targets.network_map(),
        "storage_map": storage, "limits": LIMITS})
    preflight = hyperctl_json(address, "plan", "preflight", plan_id)
    assert preflight["ok"] and len(preflight["vms"]) == 12
    with BusMonitor(address) as monitor:
        assert run_hyperctl(address, "plan", "start", plan_id).returncode == 0
        monitor.wait_for_line(plan_path(plan_id), "'Status': <'completed'>", timeout=900)
    report = hyperctl_json(address, "plan", "report", plan_id)
    assert report["status"] == "completed" and report["final"]
    assert report["moved"] == 12 and report["counts"] == {"completed": 12}
    assert report["verified"] == 0

    lines = {line["name"]: line for line in report["vms"]}
    times = job_times(service_dir / "state" / "hypersdk.db",
                      [line["job_id"] for line in lines.values()])
    # the limits, as the store saw the jobs run
    intervals = {name: times[line["job_id"]][:2] for name, line in lines.items()}
    assert max_overlap(list(intervals.values())) == LIMITS["per_plan"]
    for key in ("host", "datastore"):
        for value in {vm[key] for vm in vms}:
            group = [intervals[vm["name"]] for vm in vms if vm[key] == value]
            assert max_overlap(group) <= LIMITS[f"per_{key}"], (key, value)

    for vm in vms:
        line = lines[vm["name"]]
        started, finished, error = times[line["job_id"]]
        assert (line["state"], line["error"], error) == ("completed", "", "")
        assert line["host"] == vm["host"] and line["datastore"] == vm["datastore"]
        assert line["seconds"] == pytest.approx(finished - started)
        assert line["verification"] == "not requested" and line["verified"] is False
        assert line["domain"] == vm["name"]
        _check_domain(targets, vm, storage[vm["datastore"]])

    path = Path(plan_property(address, plan_id, "ReportPath"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    written = json.loads(path.read_text())
    assert written["vms"] == report["vms"] and written["status"] == "completed"
    assert "plan " + plan_id + " completed" in daemon.log()


def _check_domain(targets, vm: dict, storage: dict) -> None:
    """The domain's NIC is where network_map sends the VM's network, with its MAC; its
    disk is in the storage_map directory of its datastore, in that format."""
    xml = etree.fromstring(targets.conn.lookupByName(vm["name"]).XMLDesc(0))
    (nic,) = xml.findall("devices/interface")
    kind, name = next(iter(targets.network_map()[vm["network"]].items()))
    assert nic.get("type") == kind and nic.find("source").get(kind) == name
    assert nic.find("mac").get("address") == vm["mac"]
    (disk,) = xml.findall("devices/disk")
    source = Path(disk.find("source").get("file"))
    assert source.parent == Path(storage["directory"]) / vm["name"]
    assert disk.find("driver").get("type") == storage.get("format", "qcow2")
    assert source.is_file() and os.path.getsize(source) > 0
