"""A real VMware-shaped Debian guest is migrated and boots on KVM only when converted.

The guest (tests/support/guest_image.py: mmdebstrap, cached under /var/tmp) has root
by device name in fstab, an initramfs without virtio and open-vm-tools. Uploaded
behind a vSphere simulator VM as a streamOptimized VMDK, one export job with the
Direct Pipeline, guest_conversion and verify_boot converts it with virt-v2v-in-place,
defines it in the real libvirtd at qemu:///system, starts it and completes only once
its login prompt is on the serial console. The same disk imported without conversion
boots on virtio to no login prompt: its verification fails with the console's last
lines in the job log, and no domain is left behind.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.errors import Failed
from hypersdk.service.kvm.guest_conversion import STAGE as CONVERSION_STAGE, TOOL
from hypersdk.service.jobs.import_job import ImportKind
from tests.support.guest_image import LOGIN_PROMPT, guest_image
from tests.vcsim.harness import Simulator, prepare_image_vm
from tests.vsphere.fake_context import job_context, run_job

from .conftest import export_to_kvm, wait_for_text

# image build ~5 min on a first run; conversion (~2-3 min) and a boot to login (~1-2 min)
# run under TCG on these machines
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

VM_NAME = "DC0_H0_VM1"  # not VM0, whose UUID the other vcsim tests' domains take
GUEST_ID = "debian10_64Guest"  # the newest Debian this vcsim (0.24) knows
GUEST_MEMORY_MB = 1024
# TCG boots this guest to its login prompt in ~60-100 s on these 2-core machines
BOOT_TIMEOUT = "10m"
# the unconverted guest's initramfs gives up on its root after rootdelay (20 s)
UNCONVERTED_TIMEOUT = "150s"


@pytest.fixture(scope="module")
def debian_guest():
    started = time.monotonic()
    image = guest_image()
    print(f"guest image ready in {time.monotonic() - started:.0f} s: {image}")
    return image


async def test_converted_guest_boots_on_virtio_and_the_job_ends_verified(
        system_libvirt, guest_dir, vm_name, debian_guest):
    with Simulator() as sim:
        prepare_image_vm(sim, guest_dir, VM_NAME, vm_name, debian_guest, "guest.vmdk",
                         subformat="streamOptimized", guest_id=GUEST_ID,
                         memory_mb=GUEST_MEMORY_MB)
        started = time.monotonic()
        result, ctx = await export_to_kvm(
            sim, guest_dir, system_libvirt, vm_name,
            {"guest_conversion": True, "verify_boot": {"timeout": BOOT_TIMEOUT}}, "guest")
    print(f"export + conversion + boot to login: {time.monotonic() - started:.0f} s")
    print("\n".join(ctx.messages))
    landed = result["hyper2kvm"]["import"]
    assert ctx.stages[-3:] == [CONVERSION_STAGE, "import", "verify boot"]
    assert any(line.startswith(f"{TOOL}: ") for line in ctx.messages)
    # virt-v2v knew the guest's /dev/sda1 from the source layout and renamed it
    assert not [line for line in ctx.messages if "unknown device" in line]
    assert landed["guest_conversion"]["tool"] == TOOL
    verification = landed["verification"]
    assert verification["verified"] and verification["at"].endswith("Z")
    if verification["method"] == "console":
        assert verification["seen"][-1].endswith(LOGIN_PROMPT)
    else:  # its guest agent answered first; the login prompt follows on the console
        assert verification["method"] == "guest-agent"
        wait_for_text(Path(landed["serial_log"]), LOGIN_PROMPT)
    assert ctx.done == ctx.total > 0
    conn = libvirt.open(system_libvirt)
    xml = conn.lookupByName(vm_name).XMLDesc()
    conn.close()
    assert "<target dev='vda' bus='virtio'/>" in xml


async def test_the_same_guest_unconverted_fails_verification(system_libvirt, guest_dir,
                                                             vm_name, debian_guest):
    disk = guest_dir / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(debian_guest), str(disk)],
                   check=True, capture_output=True)
    config = parse_config({"libvirt": {"uri": system_libvirt}}, "(test)", env={})
    kind = ImportKind()
    ctx = job_context(kind, {"vm_name": vm_name, "disk_path": str(disk), "memory_mb": 1024,
                             "network": "", "os_type": "linux",
                             "verify_boot": {"timeout": UNCONVERTED_TIMEOUT}},
                      config, None)
    with pytest.raises(Failed, match=r"boot not verified: the guest did not show 'login:'"):
        await run_job(kind, ctx)
    console = [message for message in ctx.messages if message.startswith("console: ")]
    assert console, ctx.text()
    assert any("does not exist" in line or "Gave up waiting" in line
               or "(initramfs)" in line for line in console), console
    conn = libvirt.open(system_libvirt)
    assert vm_name not in [d.name() for d in conn.listAllDomains()]
    conn.close()
