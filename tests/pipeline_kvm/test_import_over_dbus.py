"""ImportToKvm as users call it: busctl -> the real hypervisord -> the import job -> the
real libvirt daemon, and the imported VM boots."""
from __future__ import annotations

import json
import uuid

import libvirt
import pytest

from tests.support.cli import (BUS_NAME, MANAGER, MANAGER_IFACE, busctl, job_property,
                               wait_for_status)
from tests.support.libvirtd import remove_domain

from tests.support.bootdisk import write_boot_disk

from .conftest import qemu_img, wait_for_line

pytestmark = pytest.mark.slow


def import_to_kvm(address: str, request: dict):
    return busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ImportToKvm", "sa{sv}",
                  json.dumps(request), "0", check=False)


@pytest.fixture
def boot_qcow2(guest_dir):
    raw = write_boot_disk(guest_dir / "boot.raw")
    qcow2 = guest_dir / "boot.qcow2"
    qemu_img("convert", "-O", "qcow2", str(raw), str(qcow2))
    return qcow2


async def test_import_to_kvm_over_dbus_defines_autostarts_and_boots(
        system_bus, start_hypervisord, system_libvirt, boot_qcow2):
    start_hypervisord(libvirt={"uri": system_libvirt})
    name = "hypersdk-dbus-" + uuid.uuid4().hex[:6]
    request = {"vm_name": name, "disk_path": str(boot_qcow2), "memory_mb": 64, "vcpus": 1,
               "network": "", "autostart": True, "start": True}
    reply = import_to_kvm(system_bus.address, request)
    assert reply.returncode == 0, reply.stderr
    path = json.loads(reply.stdout.split()[1])
    conn = libvirt.open(system_libvirt)
    try:
        status = wait_for_status(system_bus.address, path, {"completed", "failed"}, timeout=60)
        assert status == "completed", job_property(system_bus.address, path, "Error")
        result = json.loads(job_property(system_bus.address, path, "Result"))
        assert result["domain"] == name and result["started"] and result["autostart"]
        domain = conn.lookupByName(name)
        assert domain.isActive() == 1 and domain.autostart() == 1
        wait_for_line(boot_qcow2.parent / f"{name}.serial.log")
        # the same name again: the job fails and the running domain is untouched
        again = json.loads(import_to_kvm(system_bus.address, request).stdout.split()[1])
        assert wait_for_status(system_bus.address, again, {"completed", "failed"}) == "failed"
        assert "already exists" in job_property(system_bus.address, again, "Error")
        assert conn.lookupByName(name).isActive() == 1
        # another name on the disk the running VM uses: refused, two VMs never share a disk
        other = json.loads(import_to_kvm(system_bus.address, {**request, "vm_name": name + "-2"})
                           .stdout.split()[1])
        assert wait_for_status(system_bus.address, other, {"completed", "failed"}) == "failed"
        assert "another process using the image" in job_property(system_bus.address, other,
                                                                  "Error")
    finally:
        remove_domain(conn, name)
        conn.close()


def test_bad_import_request_is_refused_with_the_field_named(system_bus, hypervisord, guest_dir):
    for path, rule in [("/nonexistent.qcow2", "is outside the source roots"),
                       (f"{guest_dir}/nonexistent.qcow2", "no such file or directory")]:
        reply = import_to_kvm(system_bus.address, {"vm_name": "x", "disk_path": path,
                                                   "memory_mb": 64})
        assert reply.returncode != 0
        assert f"disk_path: {path}" in reply.stderr.replace("'", "") and rule in reply.stderr
