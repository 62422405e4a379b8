"""Import into libvirt: test:///default in-process, and the real qemu:///system daemon."""
from __future__ import annotations

import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from hypersdk.service.errors import AlreadyExists, NotFound, Unavailable
from hypersdk.service.kvm.domain_xml import DomainDisk, DomainNic, DomainSpec
from hypersdk.service.kvm.libvirt_import import import_domain

from tests.support.libvirtd import remove_domain

from .conftest import qemu_img

TEST_URI = "test:///default"


def unique(prefix: str = "vm") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def disk(tmp_path) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "16M")
    return path


def spec(disk: Path, **extra) -> DomainSpec:
    values = dict(name=unique(), memory_mb=256, vcpus=1, disks=[DomainDisk(disk)],
                  domain_type="qemu")
    values.update(extra)
    return DomainSpec(**values)


async def test_defines_in_test_driver_with_uuid_mac_and_autostart(test_driver, disk):
    vm_uuid = str(uuid.uuid4())
    wanted = spec(disk, uuid=vm_uuid, nics=[DomainNic("default", "00:50:56:01:02:03")],
                  os_family="linux")
    result = await import_domain(TEST_URI, wanted, autostart=True)
    assert (result.name, result.uuid, result.autostart) == (wanted.name, vm_uuid, True)
    domain = test_driver.lookupByName(wanted.name)
    assert domain.UUIDString() == vm_uuid
    assert domain.autostart() == 1
    root = etree.fromstring(domain.XMLDesc())
    assert root.find("devices/interface/mac").get("address") == "00:50:56:01:02:03"
    assert root.find("devices/disk/source").get("file") == str(disk)
    assert root.find("devices/disk/target").get("bus") == "virtio"


async def test_start_runs_the_domain(test_driver, disk):
    wanted = spec(disk)
    result = await import_domain(TEST_URI, wanted, start=True)
    assert result.started
    assert test_driver.lookupByName(wanted.name).isActive() == 1


async def test_existing_name_is_refused_and_left_untouched(test_driver, disk, tmp_path):
    first = spec(disk, memory_mb=256)
    await import_domain(TEST_URI, first)
    other_disk = tmp_path / "other.qcow2"
    other_disk.write_bytes(b"")
    with pytest.raises(AlreadyExists, match=f"named '{first.name}' already exists"):
        await import_domain(TEST_URI, spec(other_disk, name=first.name, memory_mb=1024))
    domain = test_driver.lookupByName(first.name)
    assert domain.maxMemory() == 256 * 1024
    assert str(disk) in domain.XMLDesc()


async def test_existing_uuid_is_refused(test_driver, disk):
    first = spec(disk, uuid=str(uuid.uuid4()))
    await import_domain(TEST_URI, first)
    with pytest.raises(AlreadyExists, match=f"'{first.name}' .* already has UUID {first.uuid}"):
        await import_domain(TEST_URI, spec(disk, uuid=first.uuid))


async def test_missing_network_is_named(test_driver, disk):
    wanted = spec(disk, nics=[DomainNic("no-such-net")])
    with pytest.raises(NotFound, match="network 'no-such-net' does not exist at test:///default"
                                       r" \(defined networks: default\)"):
        await import_domain(TEST_URI, wanted)
    assert wanted.name not in test_driver.listDefinedDomains()


async def test_missing_disk_is_named(tmp_path):
    missing = tmp_path / "gone.qcow2"
    with pytest.raises(NotFound, match=f"disk {missing} does not exist"):
        await import_domain(TEST_URI, spec(missing))


async def test_unreachable_libvirt_names_the_uri(disk):
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(Unavailable, match="cannot connect to libvirt at qemu\\+unix:///system"):
        await import_domain(uri, spec(disk))


@pytest.mark.slow
async def test_real_daemon_defines_refuses_duplicate_and_reports_missing_network(
        system_libvirt, guest_dir):
    disk = guest_dir / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "16M")
    wanted = spec(disk, name=unique("hypersdk-test"))
    conn = libvirt.open(system_libvirt)
    try:
        result = await import_domain(system_libvirt, wanted, autostart=True)
        domain = conn.lookupByName(wanted.name)
        assert domain.UUIDString() == result.uuid and domain.autostart() == 1
        with pytest.raises(AlreadyExists):
            await import_domain(system_libvirt, spec(disk, name=wanted.name))
        with pytest.raises(NotFound, match="network 'no-such-net' does not exist at qemu:///system"):
            await import_domain(system_libvirt, spec(disk, nics=[DomainNic("no-such-net")]))
    finally:
        remove_domain(conn, wanted.name)
        conn.close()


