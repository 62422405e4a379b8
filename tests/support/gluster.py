"""A GlusterFS volume served on this machine, for a libvirt `netfs` storage pool.

A netfs pool mounts a network file system; this kernel has no NFS (neither server nor
client), but it has FUSE, and GlusterFS's client is a FUSE file system. So the test
set-up runs Debian's real glusterd (started when it is not running, stopped after if
it was started here), makes a one-brick volume of a unique name under /var/tmp, and
removes the volume and its brick after. GlusterFS refuses loopback addresses for a
brick, so the brick is on the host's first global IPv4 address; without one the test
is skipped with the reason.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from .wait import wait_until


@dataclass(frozen=True)
class GlusterVolume:
    host: str
    name: str


def _gluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                          check=check, timeout=120)


def _glusterd_answers() -> bool:
    return _gluster("pool", "list", check=False).returncode == 0


def _global_ipv4() -> str:
    """The first IPv4 address of global scope ("" when there is none)."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                           capture_output=True, text=True).stdout.split()
    return next((shown[i + 1].split("/")[0] for i, word in enumerate(shown)
                 if word == "inet"), "")


def _why_not() -> str:
    """Why no GlusterFS volume can be served here ("" when one can)."""
    if not shutil.which("glusterd") or not shutil.which("mount.glusterfs"):
        return "glusterfs-server/glusterfs-client are not installed (install-system-deps.sh)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse: the GlusterFS client is a FUSE file system"
    if not _global_ipv4():
        return "no global IPv4 address: GlusterFS refuses a brick on a loopback address"
    return ""


@pytest.fixture(scope="module")
def gluster_volume() -> Iterator[GlusterVolume]:
    """A started one-brick GlusterFS volume of its own; gone after the module."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    started_here = not _glusterd_answers()
    if started_here:
        subprocess.run(["glusterd", "--log-file=/var/log/glusterfs/hypersdk-tests.log"],
                       check=True)
        wait_until(_glusterd_answers, 30, "glusterd to answer")
    host, name = _global_ipv4(), f"hsdk-{uuid.uuid4().hex[:8]}"
    brick = Path(tempfile.mkdtemp(prefix="hypersdk-brick-", dir="/var/tmp"))
    brick.chmod(0o755)  # the volume's root: the qemu user reaches the volumes in it
    try:
        _gluster("volume", "create", name, f"{host}:{brick}", "force")
        _gluster("volume", "start", name)
        yield GlusterVolume(host, name)
    finally:
        _gluster("volume", "stop", name, "force", check=False)
        _gluster("volume", "delete", name, check=False)
        shutil.rmtree(brick, ignore_errors=True)
        if started_here:
            _stop_glusterd()


def _stop_glusterd() -> None:
    """Stop the daemons this set-up started (glusterd and the brick server it forked)."""
    for program in ("glusterd", "glusterfsd"):
        subprocess.run(["pkill", "-x", program], check=False)
