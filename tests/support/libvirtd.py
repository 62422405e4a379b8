"""The real libvirt daemon at qemu:///system, started when it is not running."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .wait import wait_until

SYSTEM_URI = "qemu:///system"


def system_libvirt_reachable() -> bool:
    import libvirt
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(SYSTEM_URI).close()
        return True
    except libvirt.libvirtError:
        return False


def ensure_system_libvirt(timeout: float = 20) -> str:
    """Start virtlogd and libvirtd (left running) unless libvirtd already answers."""
    if Path("/dev/kvm").exists() and os.stat("/dev/kvm").st_mode & 0o060 != 0o060:
        # As scripts/install-system-deps.sh does: otherwise libvirtd re-probes QEMU
        # (~50 s) on every call because KVM looks unusable for the qemu user.
        subprocess.run(["chgrp", "kvm", "/dev/kvm"], check=True)
        os.chmod("/dev/kvm", 0o660)
    if not system_libvirt_reachable():
        for directory in ("/var/log/libvirt", "/run/libvirt"):
            os.makedirs(directory, exist_ok=True)
        subprocess.run(["virtlogd", "--daemon"], check=False)
        subprocess.run(["libvirtd", "--daemon"], check=True)
        wait_until(system_libvirt_reachable, timeout, f"libvirtd to answer at {SYSTEM_URI}")
    return SYSTEM_URI


def remove_domain(conn, name: str) -> None:
    """Stop and undefine domain `name` (with its NVRAM) if it exists. Stopping and
    undefining are separate steps: a domain that is not running is still undefined."""
    import libvirt
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return  # not defined
    try:
        domain.destroy()
    except libvirt.libvirtError:
        pass  # not running
    domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def domain_defined(conn, name: str) -> bool:
    """Whether a domain named `name` is defined (running or not)."""
    import libvirt
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True
