"""How libguestfs tools (virt-v2v-in-place, guestfish) run on this host.

libguestfs boots a small appliance under QEMU with `-cpu max` and KVM when it can.
On nested-KVM hosts that QEMU dies at its vCPU set-up ("failed to set MSR 0x10a")
just as a guest's does (see cpu_choice.py), so QEMU is first asked, once per
process, to set up exactly such a vCPU (paused, no devices: ~50 ms); when it cannot,
the appliance runs under TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg), slower but sure.
The `direct` backend runs QEMU itself, as root, without the libvirt daemon.
"""
from __future__ import annotations

import functools
import os
import subprocess

QEMU = "qemu-system-x86_64"
_QMP_QUIT = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


@functools.cache
def kvm_runs_appliance() -> bool:
    """True when QEMU can set up libguestfs' KVM vCPU (`-cpu max`) on this host."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        probe = subprocess.run([QEMU, "-machine", "accel=kvm", "-cpu", "max", "-S", "-nodefaults",
                                "-display", "none", "-no-user-config", "-qmp", "stdio"],
                               input=_QMP_QUIT, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def appliance_env() -> dict[str, str]:
    """The environment variables libguestfs tools run with here."""
    env = {"LIBGUESTFS_BACKEND": "direct"}
    if not kvm_runs_appliance():
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def accelerator() -> str:
    """How the appliance runs, for logs: KVM or TCG."""
    return "KVM" if kvm_runs_appliance() else "TCG (KVM cannot run its vCPU here)"
