"""Targets for the tests: the real libvirtd reached through a real sshd (qemu+ssh://),
with storage pools made for a test and removed after it.

The pools are transient (storagePoolCreateXML): a `dir` pool in a new directory under
/var/tmp, a `logical` pool on a volume group of its own on a loop device over a file
under /var/tmp, and a `netfs` pool mounting a GlusterFS volume (tests/support/gluster.py).
All are made through the local qemu:///system connection, the same libvirtd the test
reaches over SSH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import libvirt
import pytest

from .gluster import GlusterVolume
from .libvirtd import ensure_system_libvirt
from .sshd import LoopbackSshd
from .tls_libvirt import TlsLibvirt

DEVICE_MAPPER = Path("/dev/mapper/control")


@pytest.fixture(scope="module")
def loopback_sshd() -> Iterator[LoopbackSshd]:
    """The real sshd on a loopback port, root's key made for it (tests/support/sshd.py)."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("/usr/sbin/sshd is not installed (scripts/install-system-deps.sh)")
    base = Path(tempfile.mkdtemp(prefix="hypersdk-sshd-", dir="/run"))
    server = LoopbackSshd(base)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def local_libvirt() -> Iterator[libvirt.virConnect]:
    """An open qemu:///system connection (libvirtd started when it is not running)."""
    conn = libvirt.open(ensure_system_libvirt())
    yield conn
    conn.close()


@contextmanager
def dir_pool(conn) -> Iterator[libvirt.virStoragePool]:
    """A transient dir pool in a new directory; its volumes and the directory go after."""
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-pool-", dir="/var/tmp"))
    directory.chmod(0o755)  # the qemu user reaches the volumes
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>hsdk-dir-{uuid.uuid4().hex[:8]}</name>"
        f"<target><path>{directory}</path></target></pool>", 0)
    try:
        yield pool
    finally:
        _remove_pool(pool)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def netfs_pool(conn, volume: GlusterVolume) -> Iterator[libvirt.virStoragePool]:
    """A transient netfs pool: libvirt mounts the GlusterFS `volume` on a new directory;
    its volumes go after, the pool is unmounted and the directory removed."""
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-netfs-", dir="/var/tmp"))
    pool = conn.storagePoolCreateXML(
        f"<pool type='netfs'><name>hsdk-netfs-{uuid.uuid4().hex[:8]}</name>"
        f"<source><host name='{volume.host}'/><dir path='/{volume.name}'/>"
        "<format type='glusterfs'/></source>"
        f"<target><path>{directory}</path></target></pool>", 0)
    try:
        yield pool
    finally:
        _remove_pool(pool)
        directory.rmdir()


def device_mapper_missing() -> str:
    """Why LVM volumes cannot be activated here ("" when they can)."""
    try:
        os.close(os.open(DEVICE_MAPPER, os.O_RDWR))
    except OSError as exc:
        return (f"the kernel has no device-mapper ({DEVICE_MAPPER}: {exc.strerror}): LVM "
                "can make a volume group but no logical volume")
    return ""


@contextmanager
def logical_pool(conn, size: str = "1G",
                 with_volumes: bool = True) -> Iterator[libvirt.virStoragePool]:
    """A transient logical pool on a volume group of its own (a unique name) on a loop
    device over a file under /var/tmp; the volume group, the loop device and the file
    go after. A test that needs volumes in it is skipped where the kernel has no
    device-mapper (the pool itself still starts there)."""
    missing = device_mapper_missing()
    if missing and with_volumes:
        pytest.skip(missing)
    backing = Path(tempfile.mkstemp(prefix="hypersdk-lvm-", suffix=".img", dir="/var/tmp")[1])
    group = f"hsdk_vg_{uuid.uuid4().hex[:8]}"
    subprocess.run(["truncate", "-s", size, str(backing)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["vgcreate", "-q", group, loop], check=True, capture_output=True)
        pool = conn.storagePoolCreateXML(
            f"<pool type='logical'><name>{group}</name><source><name>{group}</name>"
            f"<format type='lvm2'/></source><target><path>/dev/{group}</path></target>"
            "</pool>", 0)
        try:
            yield pool
        finally:
            _remove_pool(pool)
    finally:
        subprocess.run(["vgremove", "-q", "-f", group], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        backing.unlink()


def _remove_pool(pool) -> None:
    """Delete what a test left in the pool, then stop the (transient) pool."""
    pool.refresh(0)
    for volume in pool.listAllVolumes(0):
        volume.delete(0)
    pool.destroy()


def volume_names(pool) -> list[str]:
    pool.refresh(0)
    return sorted(volume.name() for volume in pool.listAllVolumes(0))


@pytest.fixture(scope="module")
def tls_libvirt() -> Iterator[TlsLibvirt]:
    """libvirtd behind a TLS listener on a loopback port (tests/support/tls_libvirt.py)."""
    ensure_system_libvirt()
    base = Path(tempfile.mkdtemp(prefix="hypersdk-tls-", dir="/run"))
    server = TlsLibvirt(base)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)
