"""How libguestfs tools (virt-v2v-in-place, guestfish) run on this host.

libguestfs boots a small appliance (the host's kernel) under QEMU with `-cpu max` and
KVM when it can. On nested-KVM hosts that QEMU either dies at its vCPU set-up
("failed to set MSR 0x10a") or runs a kernel that prints nothing, just as a guest's
does (see cpu_choice.py). So QEMU is first asked, once per process, to boot the
host's kernel that way (no disk, `console=ttyS0`, `panic=-1` with `-no-reboot`: it
exits as soon as the kernel finds no root, ~2 s where KVM works): when "Linux version"
is not on its console within KERNEL_PROBE_SECONDS, the appliance runs under TCG
(LIBGUESTFS_BACKEND_SETTINGS=force_tcg), slower but sure.
The `direct` backend runs QEMU itself, as root, without the libvirt daemon.
"""
from __future__ import annotations

import functools
import os
import subprocess

from .cpu_choice import KERNEL_BANNER, KERNEL_PROBE_SECONDS, host_kernel

QEMU = "qemu-system-x86_64"


@functools.cache
def kvm_runs_appliance() -> bool:
    """True when a kernel runs under KVM with `-cpu max` on this host."""
    kernel = host_kernel()
    if kernel is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    command = [QEMU, "-machine", "accel=kvm", "-cpu", "max", "-m", "256", "-nodefaults",
               "-display", "none", "-no-user-config", "-no-reboot", "-serial", "stdio",
               "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"]
    try:
        probe = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=KERNEL_PROBE_SECONDS)
        output = probe.stdout
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
    except OSError:
        return False
    return KERNEL_BANNER in output


def appliance_env() -> dict[str, str]:
    """The environment variables libguestfs tools run with here."""
    env = {"LIBGUESTFS_BACKEND": "direct"}
    if not kvm_runs_appliance():
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def accelerator() -> str:
    """How the appliance runs, for logs: KVM or TCG."""
    return "KVM" if kvm_runs_appliance() else "TCG (KVM cannot run a kernel here)"
