"""Warm exports as jobs of a real hypervisord on the private bus, from the vSphere
simulator with its extension (tests/vcsim/cbt.go): cutover by a call and by time,
cancel, Cutover's errors and bad definitions."""
from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from tests.support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, BusMonitor, busctl,
                               job_property, submit, wait_for_status)
from tests.vcsim.harness import find_vm, folder_bytes

from hypersdk.service.providers.vsphere_warm import _snapshot_tree

from .conftest import WARM_VM, DatastoreGate

BLOCK = 64 << 10


@pytest.fixture
def warm_hypervisord(start_hypervisord, sim):
    return start_hypervisord(providers={"vsphere": sim.provider_settings()},
                             export={"chunk_size": "256KiB"})


def _definition(export_path: str, **warm) -> dict:
    return {"vm_identifier": WARM_VM, "provider": "vsphere", "export_method": "disk",
            "export_path": export_path, "warm": True, **warm}


def _submit(address: str, definition: dict) -> str:
    return json.loads(submit(address, definition).stdout.split()[1])


def _cutover(address: str, path: str, check: bool = True) -> subprocess.CompletedProcess:
    return busctl(address, "call", BUS_NAME, path, JOB_IFACE, "Cutover", "a{sv}", "0",
                  check=check)


def _write(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _same(a, b) -> bool:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True).returncode == 0


async def test_warm_export_copies_the_delta_at_a_cutover_call_and_reports_downtime(
        warm_hypervisord, system_bus, sim, si, running_vm, service_dir):
    address = system_bus.address
    with BusMonitor(address) as monitor:
        path = _submit(address, _definition("warm-call", precopy_interval=3600))
        await asyncio.to_thread(monitor.wait_for, "pre-copy round 1", 60)
        assert job_property(address, path, "Stage") == "precopy round 1"
        _write(running_vm, 1 << 20, b"a" * (2 * BLOCK))  # two blocks change while it runs
        served = folder_bytes(sim)
        _cutover(address, path)
        status = await asyncio.to_thread(wait_for_status, address, path,
                                         {"completed", "failed"}, 60)
    assert status == "completed", job_property(address, path, "Error")
    assert folder_bytes(sim) - served == 2 * BLOCK  # the final round read the delta only
    result = json.loads(job_property(address, path, "Result"))
    assert [(r["round"], r["bytes"], r["final"]) for r in result["rounds"]] == [
        (1, 4 << 20, False), (2, 2 * BLOCK, True)]
    assert 0 < result["downtime_seconds"] < 60
    [disk] = result["disks"]
    assert disk["format"] == "raw" and disk["path"].endswith(f"{WARM_VM}-disk1.raw")
    assert _same(disk["path"], running_vm)
    assert str(find_vm(si, WARM_VM).runtime.powerState) == "poweredOff"
    assert _snapshot_tree(si, find_vm(si, WARM_VM)._moId) == []
    again = _cutover(address, path, check=False)
    assert again.returncode != 0 and "has already completed" in again.stderr


async def test_warm_export_cuts_over_at_cutover_at(warm_hypervisord, system_bus, si,
                                                   running_vm):
    address = system_bus.address
    when = datetime.now(timezone.utc) + timedelta(seconds=3)
    path = _submit(address, _definition("warm-time", precopy_interval=3600,
                                        cutover_at=when.isoformat()))
    status = await asyncio.to_thread(wait_for_status, address, path,
                                     {"completed", "failed"}, 60)
    assert status == "completed", job_property(address, path, "Error")
    result = json.loads(job_property(address, path, "Result"))
    assert [r["final"] for r in result["rounds"]] == [False, True]
    assert datetime.fromtimestamp(job_property(address, path, "EndTime") / 1e6,
                                  timezone.utc) >= when
    assert _same(result["disks"][0]["path"], running_vm)


async def test_cancelling_a_warm_export_leaves_no_snapshot_and_no_image(
        warm_hypervisord, system_bus, si, running_vm, service_dir):
    address = system_bus.address
    with BusMonitor(address) as monitor:
        path = _submit(address, _definition("warm-cancel", precopy_interval=3600))
        await asyncio.to_thread(monitor.wait_for, "pre-copy round 1", 60)
        busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "CancelJob", "sa{sv}",
               job_property(address, path, "Id"), "0")
        assert await asyncio.to_thread(wait_for_status, address, path, {"cancelled"}) \
            == "cancelled"
    export_dir = service_dir / "exports" / "warm-cancel"
    assert not export_dir.exists() or list(export_dir.iterdir()) == []
    assert _snapshot_tree(si, find_vm(si, WARM_VM)._moId) == []
    assert str(find_vm(si, WARM_VM).runtime.powerState) == "poweredOn"  # never cut over


async def test_cutover_of_a_job_that_is_not_warm_is_refused(warm_hypervisord, system_bus,
                                                           running_vm):
    address = system_bus.address
    definition = {**_definition("cold"), "warm": False, "options": {"shutdown_vm": True}}
    path = _submit(address, definition)
    refused = _cutover(address, path, check=False)
    assert refused.returncode != 0 and "is not a warm migration" in refused.stderr
    await asyncio.to_thread(wait_for_status, address, path, {"completed", "failed"}, 60)


@pytest.mark.parametrize("changes, message", [
    ({"precopy_interval": 0}, "precopy_interval: an integer >= 1"),
    ({"precopy_interval": "1h"}, "precopy_interval: an integer"),
    ({"cutover_at": "tomorrow"}, "cutover_at: an ISO 8601 time with a time zone"),
    ({"cutover_at": "2026-12-08T02:00:00"}, "cutover_at: an ISO 8601 time with a time zone"),
    ({"warm": "yes"}, "warm: true or false"),
    ({"warm": False, "precopy_interval": 60}, "precopy_interval: needs warm: true"),
    ({"provider": "ova"}, "warm: provider 'ova' (ova) cannot do warm migration"),
])
def test_bad_warm_definitions_are_refused_naming_the_field(warm_hypervisord, system_bus,
                                                           changes, message):
    refused = submit(system_bus.address, {**_definition("bad"), **changes}, check=False)
    assert refused.returncode != 0
    assert message in refused.stderr, refused.stderr


def test_capabilities_say_which_providers_can_do_warm_migration(sim):
    from hypersdk.service.config import parse_config
    from hypersdk.service.providers.registry import ProviderRegistry

    config = parse_config({"providers": {"vsphere": sim.provider_settings()}}, "(test)", env={})
    rows = {row["name"]: row for row in ProviderRegistry(config).capabilities()}
    assert (rows["vsphere"]["warm"], rows["vsphere"]["warm_reason"]) == (True, "")
    assert rows["ova"]["warm"] is False and "changed-block" in rows["ova"]["warm_reason"]
    assert (rows["aws"]["warm"], rows["aws"]["warm_reason"]) == (True, "")  # EBS snapshots
    assert rows["azure"]["warm"] is False and rows["azure"]["warm_reason"]


async def test_cancelling_a_warm_export_mid_round_leaves_no_snapshot_and_no_image(
        start_hypervisord, system_bus, sim, si, running_vm, service_dir):
    address = system_bus.address
    proxy = await DatastoreGate(sim.host, sim.port).start()
    proxy.armed = True  # round 1 is held in its first read
    try:
        await asyncio.to_thread(
            start_hypervisord, providers={"vsphere": sim.provider_settings(port=proxy.port)})
        path = _submit(address, _definition("warm-held", precopy_interval=3600))
        await asyncio.wait_for(proxy.holding.wait(), 30)
        assert [name for name in _snapshot_names(si)] == [
            f"hypersdk-warm-{job_property(address, path, 'Id')}-1"]
        busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "CancelJob", "sa{sv}",
               job_property(address, path, "Id"), "0")
        assert await asyncio.to_thread(wait_for_status, address, path, {"cancelled"}) \
            == "cancelled"
    finally:
        proxy.release.set()
        await proxy.close()
    export_dir = service_dir / "exports" / "warm-held"
    assert not export_dir.exists() or list(export_dir.iterdir()) == []
    assert _snapshot_names(si) == []


def _snapshot_names(si) -> list[str]:
    def names(trees):
        return [n for tree in trees for n in [tree.name, *names(tree.childSnapshotList or [])]]
    return names(_snapshot_tree(si, find_vm(si, WARM_VM)._moId))
