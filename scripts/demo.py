"""`make demo`: the main job end to end on this machine, no cloud account needed.

1. the govmomi vSphere simulator (built from Debian's package) with a VM whose disk is
   a real Debian 12 guest shaped like a VMware one (tests/support/guest_image.py: root
   by /dev/sda1 in fstab, no virtio in its initramfs, open-vm-tools), built with
   mmdebstrap on the first run (~5 min) and cached under /var/tmp;
2. a private system bus and the real `hypervisord` on it, configured for the simulator
   and the local libvirt daemon (qemu:///system, started if needed);
3. `hyperctl` lists the VMs, submits the spec's export job with the direct pipeline
   (export → convert to qcow2 → guest conversion with virt-v2v-in-place → define in
   libvirt with autostart → start → verify the boot) and watches it;
4. the job completes once the migrated guest's login prompt is on its serial console,
   which is shown.

Everything it starts is stopped at the end; the domain is removed unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.guest_image import LOGIN_PROMPT, guest_image  # noqa: E402
from hypersdk.service.kvm.boot_verify import console_text, last_lines  # noqa: E402
from tests.support.hypervisord import Hypervisord, write_config  # noqa: E402
from tests.support.libvirtd import ensure_system_libvirt, remove_domain  # noqa: E402
from tests.support.system import PrivateSystemBus  # noqa: E402
from tests.vcsim.harness import Simulator, prepare_image_vm  # noqa: E402

SOURCE_VM = "DC0_H0_VM0"
GUEST_ID = "debian10_64Guest"  # the newest Debian this vcsim (0.24) knows
GUEST_MEMORY_MB = 1024
DOMAIN = "hypersdk-demo"  # the default; --name for another (the tests use their own)
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def forget(uri: str, name: str, images: Path) -> None:
    """The demo's domain and its disks, gone (before a run, and after one unless --keep)."""
    import libvirt
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(uri)
    try:
        remove_domain(conn, name)
    finally:
        conn.close()
    shutil.rmtree(images, ignore_errors=True)


def hyperctl(bus: str, *args: str, capture: bool = False) -> str:
    result = subprocess.run([HYPERCTL, "--bus", bus, *args], text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise SystemExit(f"hyperctl {' '.join(args)} failed ({result.returncode})")
    return result.stdout or ""


def run(name: str, keep: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="hypersdk-demo-", dir="/var/tmp"))
    workdir.chmod(0o755)
    images = Path("/var/lib/libvirt/images") / name
    uri = ensure_system_libvirt()
    forget(uri, name, images)
    try:
        migrate(name, workdir, images, uri)
    finally:  # a failed run leaves nothing defined either
        if not keep:
            forget(uri, name, images)
            print(f"\n(domain {name} removed again; run with --keep to leave it defined)")
        shutil.rmtree(workdir, ignore_errors=True)


def migrate(name: str, workdir: Path, images: Path, uri: str) -> None:
    say("1. vSphere simulator with a VMware-shaped Debian 12 guest")
    image = guest_image()  # built once (~5 min), then cached
    with Simulator() as sim:
        prepare_image_vm(sim, workdir, SOURCE_VM, name, image, "guest.vmdk",
                         subformat="streamOptimized", guest_id=GUEST_ID,
                         memory_mb=GUEST_MEMORY_MB)
        print(f"simulator at {sim.host}:{sim.port}; VM {SOURCE_VM} renamed {name}")
        bus = PrivateSystemBus.start(workdir / "bus")
        daemon = None
        try:
            say("2. hypervisord on a private system bus")
            config = write_config(workdir, providers={"vsphere": sim.provider_settings()},
                                  hyper2kvm={"output_dir": str(images),
                                             "watch_dir": str(workdir / "watch")},
                                  libvirt={"uri": uri}, daemon={"log_level": "info"})
            daemon = Hypervisord(config, bus.address, module="hypersdk.service.daemon")
            daemon.start()
            print(f"ready ({daemon.notifications[-1].strip()}); config {config}")
            say("3. hyperctl vms --provider vsphere")
            hyperctl(bus.address, "vms", "--provider", "vsphere")
            job = {"vm_identifier": name, "provider": "vsphere", "export_method": "ova",
                   "export_path": str(workdir / "exports" / name),
                   "options": {"shutdown_vm": False, "remove_cdrom": True, "compress": True},
                   "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                             "daemon_mode": False, "import_to_kvm": True,
                                             "autostart": True, "guest_conversion": True,
                                             "verify_boot": True}}
            job_file = workdir / "job.json"
            job_file.write_text(json.dumps(job, indent=2))
            say(f"4. hyperctl submit {job_file}")
            print(job_file.read_text())
            job_id = json.loads(hyperctl(bus.address, "submit", str(job_file), "--json",
                                         capture=True))["job_id"]
            say(f"5. hyperctl watch {job_id}")
            hyperctl(bus.address, "watch", job_id)
            say(f"6. hyperctl logs {job_id}")
            hyperctl(bus.address, "logs", job_id)
            show_domain(uri, name, images)
        finally:
            if daemon:
                daemon.stop()
            bus.stop()


def show_domain(uri: str, name: str, images: Path) -> None:
    say(f"7. virsh -c {uri} dominfo {name}")
    subprocess.run(["virsh", "-c", uri, "dominfo", name], check=True)
    serial = next(images.rglob(f"{name}.serial.log"))  # the import logs it beside the disk
    say(f"8. the migrated VM's serial console ({serial}), last lines")
    deadline = time.monotonic() + 120  # the job may have been verified by the guest agent
    while LOGIN_PROMPT not in console_text(serial):
        if time.monotonic() > deadline:
            raise SystemExit(f"the VM did not show {LOGIN_PROMPT!r} on its serial console")
        time.sleep(0.5)
    print("\n".join(last_lines(console_text(serial), 12)))
    print("\nThe VM was exported from vSphere, converted, made bootable on virtio, defined "
          "in libvirt and booted to its login prompt.")


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make demo runs as root (it starts libvirtd and a system bus)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the domain defined")
    parser.add_argument("--name", default=DOMAIN, help=f"the VM and domain name ({DOMAIN})")
    args = parser.parse_args()
    run(args.name, args.keep)


if __name__ == "__main__":
    main()
