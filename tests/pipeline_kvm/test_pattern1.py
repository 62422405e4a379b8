"""The spec's Pattern 1 (Direct Pipeline) end to end, and the VM really boots.

A VM in the vSphere simulator gets a disk whose first sector prints a line on COM1.
One export job with `hyper2kvm_integration` {auto_convert, import_to_kvm, autostart,
start} exports it, converts it, defines it in the real libvirt daemon at
qemu:///system and starts it; the line must appear on the domain's serial console.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import libvirt
import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.pipeline.export import ExportKind
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.bootdisk import BOOT_LINE
from tests.vcsim.harness import Simulator, prepare_boot_vm
from tests.vsphere.fake_context import job_context, run_job

pytestmark = pytest.mark.slow

VM_NAME = "DC0_H0_VM0"
DISK_SIZE = 4 << 20


@pytest.fixture
def vm_name(system_libvirt):
    """A unique VM (and so domain) name; the domain is removed after the test."""
    name = "hypersdk-p1-" + uuid.uuid4().hex[:6]
    conn = libvirt.open(system_libvirt)
    yield name
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        domain = None
    if domain is not None:
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    conn.close()


@pytest.mark.parametrize("descriptor_names", ["the-exported-file", "another-file"])
async def test_pattern1_export_convert_import_autostart_boots(system_libvirt, guest_dir,
                                                              vm_name, descriptor_names):
    # the export names the file <vm>-disk1.vmdk; a VMDK renamed on the way (as any real
    # export is) still records its old name in the embedded descriptor
    upload_name = (f"{vm_name}-disk1.vmdk" if descriptor_names == "the-exported-file"
                   else "boot.vmdk")
    with Simulator() as sim:
        prepare_boot_vm(sim, guest_dir, VM_NAME, vm_name, upload_name=upload_name)
        config = parse_config({
            "export": {"base_path": str(guest_dir / "exports"), "chunk_size": "256KiB"},
            "hyper2kvm": {"output_dir": str(guest_dir / "images")},
            "libvirt": {"uri": system_libvirt},
            "providers": {"vsphere": sim.provider_settings()},
        }, "(test)", env={})
        (guest_dir / "exports").mkdir()
        registry = ProviderRegistry(config)
        kind = ExportKind()
        ctx = job_context(kind, {
            "vm_identifier": vm_name, "provider": "vsphere", "export_method": "ova",
            "export_path": "pattern1", "options": {"shutdown_vm": False, "remove_cdrom": True},
            "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                      "import_to_kvm": True, "autostart": True, "start": True},
        }, config, registry)
        try:
            result = await run_job(kind, ctx)
        finally:
            await registry.close()

    handoff = result["hyper2kvm"]
    assert handoff["mode"] == "builtin"
    assert ctx.stages[-2:] == ["convert", "import"]
    assert ctx.done == ctx.total > 0
    conn = libvirt.open(system_libvirt)
    domain = conn.lookupByName(vm_name)
    assert domain.isActive() == 1 and domain.autostart() == 1
    assert domain.UUIDString() == handoff["import"]["uuid"]
    conn.close()
    serial = Path(handoff["import"]["serial_log"])
    deadline = time.monotonic() + 60
    while not (serial.is_file() and BOOT_LINE in serial.read_bytes()):
        assert time.monotonic() < deadline, f"no boot line on the serial console: {serial}"
        time.sleep(0.2)
