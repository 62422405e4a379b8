"""`kill -9` of hypervisord in the import stage of a Direct Pipeline export: the domain it
had defined and started (its boot not yet verified) is stopped and undefined by the next
start, the converted disk is removed (the downloaded one kept, privately, for the retry),
and the retry boots the guest.

The guest's boot sector waits BOOT_DELAY seconds before it prints its line, so the job is
held in boot verification, with its domain running, while the service is killed.
"""
from __future__ import annotations

import asyncio
import json

import libvirt
import pytest

from hypersdk.service.kvm import boot_verify
from tests.support.bootdisk import BOOT_LINE, write_boot_disk
from tests.support.cli import (BUS_NAME, MANAGER, MANAGER_IFACE, busctl_json, job_property,
                               submit, wait_for_status)
from tests.support.hypervisord import Hypervisord
from tests.support.libvirtd import domain_defined
from tests.support.staging import assert_only_private_staging_left
from tests.support.wait import until
from tests.vcsim.harness import Simulator, prepare_image_vm

pytestmark = pytest.mark.slow

VM_NAME = "DC0_H0_VM0"
BOOT_DELAY = 5.0


def _running(conn, name: str) -> bool:
    try:
        return conn.lookupByName(name).isActive() == 1
    except libvirt.libvirtError:
        return False


async def test_kill9_in_boot_verification_leaves_no_domain_and_the_retry_boots(
        start_hypervisord, system_bus, system_libvirt, libvirt_system, guest_dir, vm_name,
        service_dir):
    conn, _names = libvirt_system
    address = system_bus.address
    images = guest_dir / "images"
    export_path = service_dir / "exports" / "boot"
    with Simulator() as sim:
        raw = write_boot_disk(guest_dir / "boot.raw", 4 << 20, delay=BOOT_DELAY)
        await asyncio.to_thread(prepare_image_vm, sim, guest_dir, VM_NAME, vm_name, raw,
                                "boot.vmdk")
        daemon = await asyncio.to_thread(
            start_hypervisord, providers={"vsphere": sim.provider_settings()},
            libvirt={"uri": system_libvirt}, hyper2kvm={"output_dir": str(images)})
        definition = {
            "vm_identifier": vm_name, "provider": "vsphere", "export_method": "disk",
            "export_path": str(export_path), "options": {"shutdown_vm": False},
            "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                      "import_to_kvm": True,
                                      "verify_boot": {"timeout": "5m",
                                                      "expect": BOOT_LINE.decode()}}}
        killed = json.loads((await asyncio.to_thread(submit, address, definition))
                            .stdout.split()[1])
        await until(lambda: _running(conn, vm_name), 120, f"domain {vm_name} running")
        # killed while the boot is verified (or a moment before, right after the start)
        assert job_property(address, killed, "Stage") in {"import", boot_verify.STAGE}
        await asyncio.to_thread(daemon.kill)
        assert domain_defined(conn, vm_name)  # nothing removed it yet

        restarted = Hypervisord(daemon.config_path, address)
        await asyncio.to_thread(restarted.start)
        try:
            assert job_property(address, killed, "Status") == "failed"
            assert job_property(address, killed, "Error").startswith("interrupted:")
            assert not domain_defined(conn, vm_name)
            # the downloaded disk stays for the retry, privately; the converted one goes
            assert_only_private_staging_left(export_path)
            assert not images.exists() or list(images.rglob("*")) == []

            retried = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                                  "RetryJob", "sa{sv}", job_property(address, killed, "Id"),
                                  "0")["data"][0]
            status = await asyncio.to_thread(wait_for_status, address, retried,
                                             {"completed", "failed"}, 300)
            assert status == "completed", job_property(address, retried, "Error")
            assert _running(conn, vm_name)
            result = json.loads(job_property(address, retried, "Result"))
            assert result["hyper2kvm"]["import"]["verification"]["verified"] is True
        finally:
            await asyncio.to_thread(restarted.stop)
