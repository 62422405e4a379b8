"""Targets: disks uploaded into a storage pool of a libvirt host reached through
qemu+ssh:// (the real sshd on a loopback port, the real libvirtd behind it), the domain
defined there on the volumes, its boot verified through the console stream."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import AlreadyExists, Failed, HyperSDKError, InvalidArgument
from hypersdk.service.jobs.convert_job import ConvertKind
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.jobs.handoff import run_integration, validate_integration
from hypersdk.service.jobs.import_job import ImportKind
from hypersdk.service.model import VMInfo
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.bootdisk import BOOT_LINE, write_boot_disk
from tests.support.cli import (BUS_NAME, JOB_IFACE, busctl, job_property, submit,
                               wait_for_status)
from tests.support.hypervisord import Hypervisord
from tests.support.libvirtd import domain_defined, remove_domain
from tests.support.targets import dir_pool, logical_pool, netfs_pool, volume_names
from tests.support.wait import until
from tests.vsphere.fake_context import FakeSubmitContext, job_context, run_job

from .conftest import export_vmdk, fake_job_context, qemu_img

TARGET = "remote"


def _config(tmp_path: Path, uri: str, pool: str, fmt: str = "qcow2", **sections) -> object:
    return parse_config({
        "libvirt": {"uri": "qemu:///system"},
        "paths": {"sources": [str(tmp_path), "/var/lib/libvirt/images"],
                  "outputs": [str(tmp_path), "/var/lib/libvirt/images"]},
        "targets": {TARGET: {"uri": uri, "pool": pool, "format": fmt}},
        **sections}, "(test)", env={})


def _boot_image(directory: Path, fmt: str, size: int = 64 << 20, delay: float = 0) -> Path:
    """A bootable disk printing BOOT_LINE on the serial console, as `fmt`."""
    raw = write_boot_disk(directory / "boot.raw", size, delay=delay)
    if fmt == "raw":
        return raw
    image = directory / f"boot.{fmt}"
    qemu_img("convert", "-O", fmt, str(raw), str(image))
    raw.unlink()
    return image


def _same_image(one: str, other: str) -> bool:
    """Whether two images hold the same data (-U: one may be in use by a running domain)."""
    compared = subprocess.run(["qemu-img", "compare", "-U", one, other], capture_output=True)
    return compared.returncode == 0


@pytest.fixture
def vm(local_libvirt):
    """A unique domain name, its domain removed after the test."""
    name = "hsdk-target-" + uuid.uuid4().hex[:6]
    yield name
    remove_domain(local_libvirt, name)


# -- config and definitions ---------------------------------------------------------------

def test_config_errors_name_the_target_field():
    with pytest.raises(ConfigError) as caught:
        parse_config({"targets": {"kvm2": {"uri": "http://kvm2/", "pool": "default"},
                                  "kvm3": {"uri": "qemu+ssh://root:hunter2@kvm3/system",
                                           "pool": "default"},
                                  "kvm4": {"uri": "qemu+tls://kvm4/system"},
                                  "KVM5": {"uri": "qemu:///system", "pool": "default"}}},
                     "(test)", env={})
    lines = [str(problem) for problem in caught.value.problems]
    assert any(line.startswith("config: targets.kvm2.uri: expected a libvirt URI") and
               "'http://kvm2/'" in line for line in lines), lines
    assert any(line.startswith("config: targets.kvm3.uri: expected a URI without a password")
               for line in lines), lines
    assert not any("hunter2" in line for line in lines)  # the password is never shown
    assert "config: targets.kvm4.pool: expected a value (str), found nothing" in lines
    assert any(line.startswith("config: targets.KVM5: expected a name of lower-case")
               for line in lines), lines


def test_the_default_config_has_no_targets():
    assert parse_config({}, "(defaults)", env={}).targets == {}


def test_a_job_naming_an_unknown_target_is_refused_naming_the_field(tmp_path):
    config = _config(tmp_path, "qemu:///system", "default")
    submit_ctx = FakeSubmitContext(config, ProviderRegistry(config))
    disk = write_boot_disk(tmp_path / "disk.raw")
    cases = [
        (ImportKind(), {"vm_name": "vm", "disk_path": str(disk), "memory_mb": 64,
                        "target": "elsewhere"}, "target"),
        (ConvertKind(), {"source_path": str(disk), "output_path": str(tmp_path / "out"),
                         "target": "elsewhere"}, "target"),
        (ExportKind(), {"vm_identifier": "vm", "provider": "ova",
                        "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                                  "target": "elsewhere"}},
         "hyper2kvm_integration.target"),
    ]
    for kind, body, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            kind.validate(body, submit_ctx)
        assert caught.value.field == field
        assert str(caught.value) == (f"{field}: unknown target 'elsewhere' "
                                     f"(configured: {TARGET})")
    # a format the target does not take is refused too, naming the field
    with pytest.raises(InvalidArgument) as caught:
        ConvertKind().validate({"source_path": str(disk), "output_path": str(tmp_path / "out"),
                                "target": TARGET, "conversion_options": {"format": "raw"}},
                               submit_ctx)
    assert str(caught.value) == ("conversion_options.format: target 'remote' takes qcow2 "
                                 "volumes (targets.remote.format)")


# -- landing on a target over qemu+ssh:// ---------------------------------------------------

async def _import_and_boot(guest_dir: Path, uri: str, pool, image: Path, vm: str,
                           fmt: str = "qcow2") -> tuple[object, dict]:
    """Import the boot `image` (`fmt`) into `pool` at `uri`, its boot verified: the job's
    context and result."""
    config = _config(guest_dir, uri, pool.name(), fmt=fmt)
    ctx = job_context(ImportKind(), {
        "vm_name": vm, "disk_path": str(image), "disk_format": fmt, "memory_mb": 64,
        "network": "", "target": TARGET,
        "verify_boot": {"timeout": "2m", "expect": BOOT_LINE.decode()}}, config, None)
    result = await run_job(ImportKind(), ctx)
    assert result["verification"]["verified"]
    return ctx, result


@pytest.mark.slow
async def test_import_lands_in_a_dir_pool_over_ssh_and_boots_there(
        loopback_sshd, local_libvirt, guest_dir, vm):
    image = _boot_image(guest_dir, "qcow2")
    with dir_pool(local_libvirt) as pool:
        uri = loopback_sshd.uri()
        ctx, result = await _import_and_boot(guest_dir, uri, pool, image, vm)

        volume = f"{vm}-disk0.qcow2"
        assert result["target"] == TARGET and result["uri"] == uri
        assert [v["volume"] for v in result["volumes"]] == [volume]
        assert ctx.volumes == [(uri, pool.name(), volume)]  # recorded for the engine
        assert volume_names(pool) == [volume]
        assert _same_image(str(image), pool.storageVolLookupByName(volume).path())
        # the domain is on the volume, by pool and name, and runs
        disk = etree.fromstring(local_libvirt.lookupByName(vm).XMLDesc().encode()).find(
            "devices/disk")
        assert disk.get("type") == "volume"
        source = disk.find("source")
        assert (source.get("pool"), source.get("volume")) == (pool.name(), volume)
        assert local_libvirt.lookupByName(vm).isActive() == 1
        verification = result["verification"]
        assert verification["verified"] and verification["method"] == "console"
        assert BOOT_LINE.decode() in verification["seen"]
        assert loopback_sshd.connections() > 0  # all of it went through ssh
        assert "upload" in ctx.stages and ctx.done >= image.stat().st_size
        remove_domain(local_libvirt, vm)


@pytest.mark.slow
async def test_import_lands_in_a_dir_pool_over_tls_and_boots_there(
        tls_libvirt, local_libvirt, guest_dir, vm):
    """qemu+tls://: libvirt's client checks the server's certificate and name and shows
    its own (tests/support/tls_libvirt.py); the disk is uploaded and the guest boots."""
    image = _boot_image(guest_dir, "qcow2")
    with dir_pool(local_libvirt) as pool:
        handshakes = tls_libvirt.handshakes
        _, result = await _import_and_boot(guest_dir, tls_libvirt.uri(), pool, image, vm)
        volume = f"{vm}-disk0.qcow2"
        assert result["uri"] == tls_libvirt.uri()
        assert volume_names(pool) == [volume]
        assert _same_image(str(image), pool.storageVolLookupByName(volume).path())
        assert tls_libvirt.handshakes > handshakes  # all of it went through TLS
        remove_domain(local_libvirt, vm)


@pytest.mark.slow
async def test_a_tls_target_whose_certificate_does_not_name_its_host_is_refused(
        tls_libvirt, local_libvirt, guest_dir, vm):
    """The server's certificate names 127.0.0.1; reached as localhost, libvirt's client
    refuses it, and the job fails naming the URI before anything is made."""
    image = _boot_image(guest_dir, "qcow2")
    with dir_pool(local_libvirt) as pool:
        uri = tls_libvirt.uri(host="localhost")
        config = _config(guest_dir, uri, pool.name())
        ctx = job_context(ImportKind(), {"vm_name": vm, "disk_path": str(image),
                                         "memory_mb": 64, "network": "", "target": TARGET},
                          config, None)
        with pytest.raises(HyperSDKError) as caught:
            await run_job(ImportKind(), ctx)
        message = str(caught.value)
        assert uri in message and "Failed to verify peer's certificate" in message, message
        assert ctx.volumes == [] and volume_names(pool) == []
        assert not domain_defined(local_libvirt, vm)


@pytest.mark.slow
async def test_direct_pipeline_uploads_the_converted_disks_and_boots_on_the_target(
        loopback_sshd, local_libvirt, guest_dir, vm):
    export_dir = guest_dir / "export"
    export_dir.mkdir()
    disk = export_vmdk(export_dir, "boot", 0, size=64 << 20)
    source = VMInfo(identifier="vm-1", name=vm, provider="vsphere", cpus=1, memory_mb=64,
                    guest_os="", uuid=str(uuid.uuid4()))
    with dir_pool(local_libvirt) as pool:
        config = _config(guest_dir, loopback_sshd.uri(), pool.name(),
                         hyper2kvm={"output_dir": str(guest_dir / "out")})
        block = validate_integration({
            "enabled": True, "auto_convert": True, "import_to_kvm": True, "target": TARGET,
            "verify_boot": {"timeout": "2m", "expect": BOOT_LINE.decode()}}, config)
        ctx = fake_job_context(config)
        result = await run_integration(ctx, source, [disk], export_dir, block)
        ctx.succeed()

        assert result["target"] == TARGET
        assert [v["volume"] for v in result["volumes"]] == [f"{vm}-disk0.qcow2"]
        assert volume_names(pool) == [f"{vm}-disk0.qcow2"]
        assert result["import"]["verification"]["verified"]
        assert local_libvirt.lookupByName(vm).UUIDString() == source.uuid
        # converted in the staging directory, uploaded from there: nothing stays here
        assert [p for p in (guest_dir / "out").rglob("*") if p.is_file()] == []
        assert ctx.stages == ["convert", "import", "upload", "import", "verify boot"]


@pytest.mark.slow
async def test_convert_uploads_a_sparse_raw_volume_and_lands_nothing_locally(
        loopback_sshd, local_libvirt, guest_dir, tmp_path):
    source = _boot_image(guest_dir, "qcow2", size=1 << 30)
    out = guest_dir / "out"
    with dir_pool(local_libvirt) as pool:
        config = _config(guest_dir, loopback_sshd.uri(), pool.name(), fmt="raw")
        ctx = job_context(ConvertKind(), {"source_path": str(source), "output_path": str(out),
                                          "target": TARGET}, config, None)
        result = await run_job(ConvertKind(), ctx)

        [disk] = result["disks"]
        assert disk["volume"]["volume"] == "boot.raw" and disk["format"] == "raw"
        path = pool.storageVolLookupByName("boot.raw").path()
        assert _same_image(str(source), path)
        # 1 GiB of capacity, one sector of data: the holes stayed holes
        assert os.stat(path).st_size == 1 << 30
        assert os.stat(path).st_blocks * 512 < 1 << 20
        assert list(out.iterdir()) == []  # converted in staging, uploaded, not landed


@pytest.mark.slow
async def test_a_volume_name_taken_is_refused_and_left_untouched(
        loopback_sshd, local_libvirt, guest_dir, vm):
    image = _boot_image(guest_dir, "qcow2")
    with dir_pool(local_libvirt) as pool:
        taken = f"{vm}-disk0.qcow2"
        theirs = pool.createXML(f"<volume><name>{taken}</name><capacity>1048576</capacity>"
                                "<target><format type='raw'/></target></volume>", 0)
        before = Path(theirs.path()).read_bytes()
        config = _config(guest_dir, loopback_sshd.uri(), pool.name())
        ctx = job_context(ImportKind(), {"vm_name": vm, "disk_path": str(image),
                                         "memory_mb": 64, "network": "", "target": TARGET},
                          config, None)
        with pytest.raises(AlreadyExists) as caught:
            await run_job(ImportKind(), ctx)
        assert f"a volume named {taken!r} already exists in pool" in str(caught.value)
        assert ctx.volumes == []  # nothing recorded, so nothing would be removed
        assert volume_names(pool) == [taken]
        assert Path(theirs.path()).read_bytes() == before
        assert not domain_defined(local_libvirt, vm)


@pytest.mark.slow
async def test_logical_pool_gets_a_raw_volume_and_the_domain_boots(
        loopback_sshd, local_libvirt, guest_dir, vm):
    image = _boot_image(guest_dir, "raw")
    with logical_pool(local_libvirt) as pool:
        await _import_and_boot(guest_dir, loopback_sshd.uri(), pool, image, vm, "raw")
        assert _same_image(str(image), pool.storageVolLookupByName(f"{vm}-disk0.raw").path())
        remove_domain(local_libvirt, vm)


@pytest.mark.slow
async def test_netfs_pool_on_glusterfs_gets_a_sparse_volume_and_the_domain_boots(
        loopback_sshd, local_libvirt, gluster_volume, guest_dir, vm):
    """A netfs pool: libvirt mounts a real GlusterFS volume (FUSE; this kernel has no
    NFS); the raw disk lands there by upload over qemu+ssh and the guest boots from it."""
    image = _boot_image(guest_dir, "raw", size=256 << 20)
    with netfs_pool(local_libvirt, gluster_volume) as pool:
        await _import_and_boot(guest_dir, loopback_sshd.uri(), pool, image, vm, "raw")
        volume = f"{vm}-disk0.raw"
        assert volume_names(pool) == [volume]
        path = pool.storageVolLookupByName(volume).path()
        assert path.startswith(etree.fromstring(pool.XMLDesc().encode()).findtext("target/path"))
        assert _same_image(str(image), path)
        # 256 MiB of capacity, a few sectors of data: the holes stayed holes on GlusterFS
        assert os.stat(path).st_size == 256 << 20
        assert os.stat(path).st_blocks * 512 < 16 << 20
        remove_domain(local_libvirt, vm)


@pytest.mark.slow
async def test_a_logical_pool_refuses_a_qcow2_target_before_anything_is_made(
        loopback_sshd, local_libvirt, guest_dir, vm):
    image = _boot_image(guest_dir, "qcow2")
    with logical_pool(local_libvirt, with_volumes=False) as pool:
        config = _config(guest_dir, loopback_sshd.uri(), pool.name(), fmt="qcow2")
        ctx = job_context(ImportKind(), {"vm_name": vm, "disk_path": str(image),
                                         "memory_mb": 64, "network": "", "target": TARGET},
                          config, None)
        with pytest.raises(Failed) as caught:
            await run_job(ImportKind(), ctx)
        assert str(caught.value) == (
            f"targets.{TARGET}.format: pool {pool.name()!r} is a logical pool, which holds "
            "raw volumes only: set format: raw")
        assert ctx.volumes == [] and volume_names(pool) == []
        assert not domain_defined(local_libvirt, vm)


# -- what a job made goes when it does not complete -----------------------------------------

@pytest.mark.slow
async def test_failed_and_cancelled_jobs_remove_their_volume_and_domain(
        start_hypervisord, system_bus, loopback_sshd, local_libvirt, guest_dir, vm):
    address = system_bus.address
    image = _boot_image(guest_dir, "qcow2", delay=60)  # boots, but prints only after 60 s
    with dir_pool(local_libvirt) as pool:
        start_hypervisord(targets={TARGET: {"uri": loopback_sshd.uri(), "pool": pool.name()}})
        body = {"vm_name": vm, "disk_path": str(image), "memory_mb": 64, "network": "",
                "target": TARGET, "verify_boot": {"timeout": "3s", "expect": "never shown"}}
        failed = json.loads(submit(address, body, kind="import").stdout.split()[1])
        assert wait_for_status(address, failed, {"completed", "failed"}, 120) == "failed"
        assert job_property(address, failed, "Error").startswith("boot not verified")
        assert volume_names(pool) == [] and not domain_defined(local_libvirt, vm)

        body["verify_boot"]["timeout"] = "5m"
        cancelled = json.loads(submit(address, body, kind="import").stdout.split()[1])
        await until(lambda: job_property(address, cancelled, "Stage") == "verify boot", 120,
                    "the boot verification")
        assert volume_names(pool) == [f"{vm}-disk0.qcow2"]
        assert domain_defined(local_libvirt, vm)
        busctl(address, "call", BUS_NAME, cancelled, JOB_IFACE, "Cancel", "a{sv}", "0")
        assert wait_for_status(address, cancelled, {"cancelled", "failed", "completed"},
                               60) == "cancelled"
        assert volume_names(pool) == [] and not domain_defined(local_libvirt, vm)


@pytest.fixture
def data_disk(guest_dir) -> Path:
    """1 GiB of random data, no holes: an upload over ssh takes seconds."""
    disk = guest_dir / "data.raw"
    with open(disk, "wb") as handle:
        for _ in range(1024):
            handle.write(os.urandom(1 << 20))
    return disk


async def _submit_upload(address: str, vm: str, disk: Path) -> str:
    """Submit the import of `disk` to the raw target; its job path once it uploads (still
    uploading: BytesDone is at most a quarter second behind)."""
    job = json.loads(submit(address, {
        "vm_name": vm, "disk_path": str(disk), "disk_format": "raw", "memory_mb": 64,
        "network": "", "target": TARGET}, kind="import").stdout.split()[1])
    await until(lambda: job_property(address, job, "Stage") == "upload"
                and job_property(address, job, "BytesDone") > 0, 120, "the upload")
    assert job_property(address, job, "BytesDone") < disk.stat().st_size
    return job


@pytest.mark.slow
async def test_cancel_mid_upload_removes_the_partial_volume(
        start_hypervisord, system_bus, loopback_sshd, local_libvirt, data_disk, vm):
    address = system_bus.address
    with dir_pool(local_libvirt) as pool:
        start_hypervisord(targets={TARGET: {"uri": loopback_sshd.uri(), "pool": pool.name(),
                                            "format": "raw"}})
        job = await _submit_upload(address, vm, data_disk)
        busctl(address, "call", BUS_NAME, job, JOB_IFACE, "Cancel", "a{sv}", "0")
        assert wait_for_status(address, job, {"cancelled", "failed", "completed"},
                               60) == "cancelled"
        assert volume_names(pool) == [] and not domain_defined(local_libvirt, vm)


@pytest.mark.slow
async def test_kill9_mid_upload_leaves_no_volume_after_the_restart(
        start_hypervisord, system_bus, loopback_sshd, local_libvirt, data_disk, vm):
    address = system_bus.address
    with dir_pool(local_libvirt) as pool:
        daemon = start_hypervisord(targets={TARGET: {"uri": loopback_sshd.uri(),
                                                     "pool": pool.name(), "format": "raw"}})
        killed = await _submit_upload(address, vm, data_disk)
        daemon.kill()
        volume = f"{vm}-disk0.raw"
        assert volume_names(pool) == [volume]  # half uploaded, and nothing removed it yet

        restarted = Hypervisord(daemon.config_path, address)
        restarted.start()
        try:
            assert job_property(address, killed, "Status") == "failed"
            assert job_property(address, killed, "Error").startswith("interrupted:")
            assert volume_names(pool) == []
            assert not domain_defined(local_libvirt, vm)
        finally:
            restarted.stop()
