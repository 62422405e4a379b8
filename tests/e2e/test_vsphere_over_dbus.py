"""The spec's phases 2 and 3 driven with busctl against the simulator, as an admin would."""
from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest

from tests.support.cli import wait_for_status
from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, busctl, busctl_json,
                           gdbus_submit, job_property, submit)
from ..support.system import MEMBER, OUTSIDER
from .conftest import EXPORT_VM

pytestmark = pytest.mark.slow


def _list_vms(address: str, vm_filter: dict, user: str | None = None) -> list[dict]:
    reply = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ListVMs", "ssa{sv}",
                        "vsphere", json.dumps(vm_filter), "0", user=user)
    return json.loads(reply["data"][0])


def test_list_and_info_over_dbus(system_bus, vsphere_hypervisord, users):
    address = system_bus.address
    vms = _list_vms(address, {}, user=MEMBER)
    assert EXPORT_VM in {vm["name"] for vm in vms}
    powered_on = _list_vms(address, {"status": "poweredOn"})
    assert powered_on and all(vm["power_state"] == "poweredOn" for vm in powered_on)
    vm = next(vm for vm in vms if vm["name"] == EXPORT_VM)
    reply = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetVMInfo", "ssa{sv}",
                        "vsphere", vm["identifier"], "0")
    info = json.loads(reply["data"][0])
    assert info["name"] == EXPORT_VM and info["cpus"] == vm["cpus"]
    assert "password" not in json.dumps(info).lower()
    refused = busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ListVMs", "ssa{sv}",
                     "vsphere", "{}", "0", user=OUTSIDER, check=False)
    assert "Access denied" in refused.stderr


def test_unknown_provider_and_vm_are_named_errors(system_bus, vsphere_hypervisord):
    address = system_bus.address
    result = subprocess.run(
        ["gdbus", "call", "--address", address, "--dest", BUS_NAME, "--object-path", MANAGER,
         "--method", f"{MANAGER_IFACE}.GetVMInfo", "vsphere", "DC0_H0_VM9", "{}"],
        capture_output=True, text=True)
    assert "org.hypersdk.HyperSDK1.Error.NotFound" in result.stderr
    assert "DC0_H0_VM0" in result.stderr  # the closest names are suggested
    bad = gdbus_submit(address, {"vm_identifier": "x", "provider": "mars", "export_method": "ova",
                                 "export_path": "/tmp/x"})
    assert "Error.InvalidArgument: provider: unknown provider 'mars'" in bad.stderr


def test_export_to_ova_over_dbus(system_bus, vsphere_hypervisord, uploaded, service_dir):
    address = system_bus.address
    export_path = service_dir / "exports" / "vm0"
    definition = {"vm_identifier": EXPORT_VM, "provider": "vsphere", "export_method": "ova",
                  "export_path": str(export_path),
                  "options": {"shutdown_vm": False, "remove_cdrom": True, "compress": True}}
    path = json.loads(submit(address, definition).stdout.split()[1])
    assert wait_for_status(address, path, {"completed", "failed"}, timeout=120) == "completed", \
        job_property(address, path, "Error")
    result = json.loads(job_property(address, path, "Result"))
    ova = export_path / f"{EXPORT_VM}.ova"
    assert result["ova"] == str(ova)
    with tarfile.open(ova) as archive:
        names = archive.getnames()
        assert names[0].endswith(".ovf")
        manifest = archive.extractfile(next(n for n in names if n.endswith(".mf"))).read().decode()
        for name in names:
            if name.endswith(".vmdk"):
                digest = hashlib.sha256(archive.extractfile(name).read()).hexdigest()
                assert f"SHA256({name})= {digest}" in manifest
    assert job_property(address, path, "BytesDone") == job_property(address, path, "BytesTotal")
    lines = busctl_json(address, "call", BUS_NAME, path, JOB_IFACE, "GetLog", "ta{sv}", "0",
                        "0")["data"][0]
    assert len(lines) >= 3


def test_export_path_outside_the_base_is_refused_before_any_work(system_bus,
                                                                  vsphere_hypervisord):
    result = gdbus_submit(system_bus.address, {
        "vm_identifier": EXPORT_VM, "provider": "vsphere", "export_method": "ova",
        "export_path": "/etc/hypersdk-evil"})
    assert "Error.InvalidArgument: export_path:" in result.stderr
