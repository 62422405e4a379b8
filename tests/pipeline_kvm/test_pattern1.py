"""The spec's Pattern 1 (Direct Pipeline) end to end, and the VM really boots.

A VM in the vSphere simulator gets a disk whose first sector prints a line on COM1.
One export job with `hyper2kvm_integration` {auto_convert, import_to_kvm, autostart,
start} exports it, converts it, defines it in the real libvirt daemon at
qemu:///system and starts it; the line must appear on the domain's serial console.
"""
from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from tests.vcsim.harness import Simulator, prepare_boot_vm

from .conftest import export_to_kvm, wait_for_line

pytestmark = pytest.mark.slow

VM_NAME = "DC0_H0_VM0"
DISK_SIZE = 4 << 20


@pytest.mark.parametrize("descriptor_names", ["the-exported-file", "another-file"])
async def test_pattern1_export_convert_import_autostart_boots(system_libvirt, guest_dir,
                                                              vm_name, descriptor_names):
    # the export names the file <vm>-disk1.vmdk; a VMDK renamed on the way (as any real
    # export is) still records its old name in the embedded descriptor
    upload_name = (f"{vm_name}-disk1.vmdk" if descriptor_names == "the-exported-file"
                   else "boot.vmdk")
    with Simulator() as sim:
        prepare_boot_vm(sim, guest_dir, VM_NAME, vm_name, upload_name=upload_name)
        result, ctx = await export_to_kvm(sim, guest_dir, system_libvirt, vm_name,
                                          {"autostart": True, "start": True}, "pattern1",
                                          chunk_size="256KiB")

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
    wait_for_line(serial)
