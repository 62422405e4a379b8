"""The proof users care about: an exported VM, converted and imported, really boots.

A 512-byte boot sector that prints a line on COM1 is exported as a streamOptimized
VMDK, run through the Direct Pipeline (convert + import with autostart and start)
into the real libvirt daemon at qemu:///system, and the line must show up in the
domain's serial console log.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from lxml import etree
import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.kvm.domain_xml import DomainDisk, DomainSpec
from hypersdk.service.jobs.handoff import run_integration, validate_integration
from hypersdk.service.kvm.libvirt_import import import_domain
from hypersdk.service.model import VMInfo

from tests.support.bootdisk import write_boot_disk

from .conftest import export_vmdk, fake_job_context, qemu_img, wait_for_line

pytestmark = pytest.mark.slow


async def test_exported_vm_boots_after_direct_pipeline(libvirt_system, guest_dir, config_for):
    conn, names = libvirt_system
    export_dir = guest_dir / "export"
    export_dir.mkdir()
    disk = export_vmdk(export_dir, "boot", 0)
    vm = VMInfo(identifier="vm-1", name="hypersdk-boot-" + uuid.uuid4().hex[:6],
                provider="vsphere", cpus=1, memory_mb=64, guest_os="", uuid=str(uuid.uuid4()))
    names.append(vm.name)
    config = config_for(hyper2kvm={"output_dir": str(guest_dir / "out")},
                        libvirt={"uri": "qemu:///system"})
    block = validate_integration({"enabled": True, "auto_convert": True, "import_to_kvm": True,
                                  "autostart": True, "start": True}, config)
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, [disk], export_dir, block)
    domain = conn.lookupByName(vm.name)
    assert domain.isActive() == 1 and domain.autostart() == 1
    assert domain.UUIDString() == vm.uuid
    assert f"<domain type='{result['import']['domain_type']}'" in domain.XMLDesc()
    assert result["import"]["notes"] and "SATA" in result["import"]["notes"][0]
    wait_for_line(Path(result["import"]["serial_log"]))
    assert ctx.done == ctx.total == disk.capacity_bytes


async def test_tcg_domain_with_virtio_disk_boots(libvirt_system, guest_dir):
    conn, names = libvirt_system
    raw = write_boot_disk(guest_dir / "boot.raw")
    qcow2 = guest_dir / "boot.qcow2"
    qemu_img("convert", "-O", "qcow2", str(raw), str(qcow2))
    spec = DomainSpec(name="hypersdk-boot-" + uuid.uuid4().hex[:6], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(qcow2)], domain_type="qemu", os_family="linux",
                      serial_log=guest_dir / "serial.log")
    names.append(spec.name)
    result = await import_domain("qemu:///system", spec, start=True)
    assert result.domain_type == "qemu"
    assert "<target dev='vda' bus='virtio'/>" in conn.lookupByName(spec.name).XMLDesc()
    wait_for_line(guest_dir / "serial.log")


async def test_start_failure_leaves_no_definition(libvirt_system, guest_dir):
    conn, names = libvirt_system
    broken = guest_dir / "broken.qcow2"
    broken.write_bytes(b"this is not a qcow2 image" * 100)
    spec = DomainSpec(name="hypersdk-boot-" + uuid.uuid4().hex[:6], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(broken)], domain_type="qemu")
    names.append(spec.name)
    with pytest.raises(Failed, match=r"could not start domain .*the definition was removed "
                                     r"again\): .*not in qcow2 format"):
        await import_domain("qemu:///system", spec, start=True)
    assert spec.name not in conn.listDefinedDomains()


@pytest.mark.parametrize("secure_boot", [False, True], ids=["uefi", "uefi-secure-boot"])
async def test_uefi_domain_starts_with_its_own_nvram(libvirt_system, guest_dir, secure_boot):
    conn, names = libvirt_system
    disk = guest_dir / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "16M")
    spec = DomainSpec(name="hypersdk-boot-" + uuid.uuid4().hex[:6], memory_mb=256, vcpus=1,
                      disks=[DomainDisk(disk)], domain_type="qemu", firmware="uefi",
                      secure_boot=secure_boot)
    names.append(spec.name)
    await import_domain("qemu:///system", spec, start=True)
    domain = conn.lookupByName(spec.name)
    assert domain.isActive() == 1
    nvram = Path(etree.fromstring(domain.XMLDesc()).findtext("os/nvram"))
    assert nvram.is_file() and nvram.stat().st_size > 0
