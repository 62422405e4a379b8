"""A real Debian 12 guest shaped like one coming from VMware, built from Debian's packages.

What makes it a VMware guest that does not boot on virtio as it is:
- root by device name: `/dev/sda1` in /etc/fstab; grub for BIOS in the MBR (its
  kernel command line names root by UUID, as Debian's grub does: virt-v2v 2.2 cannot
  rewrite a device name there, and a VMware guest seldom has one);
- an initramfs built with MODULES=dep on a SCSI disk (libguestfs' appliance, as a
  VMware guest's is on its PVSCSI/LSI disk): no virtio_blk in it;
- open-vm-tools installed, and an ifupdown config for ens192 (VMware's vmxnet3 name);
- a serial console with a login prompt: kernel `console=ttyS0`, so systemd starts a
  getty there. qemu-guest-agent is installed too, for the agent check.

`mmdebstrap` builds the root file system as a tar from the host's apt sources (module
trees a VM never loads are left out); `guestfish` lays it on a partitioned raw disk and runs grub-install,
update-grub and update-initramfs inside it, so the host never boots or mounts it.
The image is cached under /var/tmp/hypersdk-guest/<hash of this file>/ between runs.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypersdk.service.kvm.libguestfs import appliance_env

CACHE_ROOT = Path(os.environ.get("HYPERSDK_GUEST_CACHE", "/var/tmp/hypersdk-guest"))
SUITE = "bookworm"
HOST_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DISK_SIZE = 2 << 30
LOGIN_PROMPT = "login:"
HOSTNAME = "hypersdk-guest"
NETWORK_CONFIG = "/etc/network/interfaces.d/ens192"
PACKAGES = ["systemd-sysv", "udev", "linux-image-amd64", "grub-pc", "initramfs-tools",
            "open-vm-tools", "qemu-guest-agent", "ifupdown"]
# kernel/... module trees no VM here loads (~180 MB of the kernel's 380)
UNUSED_MODULES = ["sound", "drivers/gpu", "drivers/media", "drivers/net/wireless",
                  "drivers/net/ethernet", "drivers/infiniband", "drivers/iio", "drivers/staging",
                  "drivers/comedi", "net/wireless", "net/mac80211", "net/bluetooth"]
_CUSTOMIZE = [
    f'echo {HOSTNAME} > "$1/etc/hostname"',
    'echo "/dev/sda1 / ext4 errors=remount-ro 0 1" > "$1/etc/fstab"',
    'printf "%s\\n" "GRUB_TIMEOUT=0" "GRUB_CMDLINE_LINUX=\\"console=ttyS0 rootdelay=20\\"" '
    '"GRUB_DISABLE_RECOVERY=true" >> "$1/etc/default/grub"',
    'echo MODULES=dep > "$1/etc/initramfs-tools/conf.d/modules-dep"',
    f'printf "allow-hotplug ens192\\niface ens192 inet dhcp\\n" > "$1{NETWORK_CONFIG}"',
    'cd "$1"/usr/lib/modules/* && rm -rf ' + " ".join(f"kernel/{m}" for m in UNUSED_MODULES),
    'chroot "$1" sh -c "depmod -a \\$(ls /usr/lib/modules)"',
]
_GUESTFISH_STEPS = """\
run
part-init /dev/sda mbr
part-add /dev/sda p 2048 -1
part-set-bootable /dev/sda 1 true
mkfs ext4 /dev/sda1
mount /dev/sda1 /
tar-in {rootfs} /
command "grub-install --target=i386-pc /dev/sda"
command update-grub
command "update-initramfs -u -k all"
"""


def recipe_digest() -> str:
    """Changes whenever this recipe (this file) does."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def guest_image(log=print) -> Path:
    """The raw disk of the guest, built once per recipe (and waited for when another
    process is building it)."""
    directory = CACHE_ROOT / recipe_digest()
    image = directory / "disk.raw"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.exists():
            build(image, log)
    return image


def build(image: Path, log=print) -> None:
    """Build the guest into `image` (written elsewhere first, then renamed)."""
    with tempfile.TemporaryDirectory(dir=image.parent, prefix="build-") as work:
        rootfs = Path(work) / "rootfs.tar"
        started = time.monotonic()
        _run(["mmdebstrap", "--variant=minbase", "--mode=root", "--include=" + ",".join(PACKAGES),
              "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
              "--dpkgopt=path-exclude=/usr/share/locale/*", '--aptopt=Acquire::Languages "none"',
              *[f"--customize-hook={step}" for step in _CUSTOMIZE], SUITE, str(rootfs), *_mirrors()])
        log(f"guest image: root file system in {time.monotonic() - started:.0f} s")
        disk = Path(work) / "disk.raw"
        with open(disk, "wb") as handle:
            handle.truncate(DISK_SIZE)
        started = time.monotonic()
        _run(["guestfish", "--rw", "--format=raw", "-a", str(disk)],
             stdin=_GUESTFISH_STEPS.format(rootfs=rootfs), env=appliance_env())
        log(f"guest image: disk laid out and made bootable in {time.monotonic() - started:.0f} s")
        os.replace(disk, image)


def _mirrors() -> list[str]:
    """The host's own apt sources (deb822 or one-line), else mmdebstrap's default."""
    return [str(path) for path in HOST_SOURCES if path.exists()][:1]


def _run(command: list[str], stdin: str | None = None, env: dict | None = None) -> None:
    result = subprocess.run(command, input=stdin or "", text=True, capture_output=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    print(guest_image(lambda line: print(line, file=sys.stderr)))
