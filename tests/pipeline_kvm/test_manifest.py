"""Artifact Manifests load in the real hyper2kvm 0.2.1 loader, and land atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hyper2kvm.manifest.loader import ManifestLoader

from hypersdk.service.confine import open_dir
from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.jobs.manifest import (build_manifest, manifest_name, mem_gb, per_disk,
                                                write_manifest)
from hypersdk.service.model import ExportedDisk, NicInfo, VMInfo

from .conftest import fake_job_context


def exported(path: Path, *, key: str, boot_order: int | None, content: bytes = b"disk",
             fmt: str = "vmdk") -> ExportedDisk:
    path.write_bytes(content)
    return ExportedDisk(path=path, format=fmt, capacity_bytes=1 << 30, file_bytes=len(content),
                        sha256=hashlib.sha256(content).hexdigest(), boot_order=boot_order,
                        label=f"Hard disk {key}", key=key)


def vm(memory_mb: int = 512, **extra) -> VMInfo:
    values = dict(identifier="vm-42", name="web 01/prod", provider="vsphere", cpus=2,
                  memory_mb=memory_mb, guest_os="ubuntu64Guest", datacenter="DC1",
                  uuid="4dea22b3-1d52-d8f3-2516-782e98ab3fa0", tags=["production"],
                  nics=[NicInfo("4000", "00:50:56:aa:bb:cc", "VM Network", "vmxnet3")])
    values.update(extra)
    return VMInfo(**values)


def the_manifest(the_vm: VMInfo, disks: list[ExportedDisk], guest_fix: bool = False) -> dict:
    return build_manifest(the_vm, disks, job_id="job-1", output_format="qcow2", compress=True,
                          guest_fix=guest_fix, export_method="ova", hypersdk_version="1.0.0")


def write(tmp_path: Path, the_vm: VMInfo, disks: list[ExportedDisk], manifest: dict | None = None,
          disk_id: str = "all") -> Path:
    watch = open_dir(tmp_path / "watch", "vsphere/to_be_processed", "hyper2kvm.watch_dir",
                     create=True)
    ctx = fake_job_context(None)
    path = write_manifest(manifest or the_manifest(the_vm, disks), ctx.staging(watch),
                          manifest_name(the_vm.name, "job-1", disk_id))
    ctx.succeed()  # the job's staging directory goes, the landed manifest stays
    return path


def load(path: Path) -> ManifestLoader:
    loader = ManifestLoader()
    loader.load(path)
    return loader


def test_512_mib_vm_loads_with_mem_rounded_up_to_1_gib(tmp_path):
    disk = exported(tmp_path / "disk0.vmdk", key="disk-2000", boot_order=0)
    path = write(tmp_path, vm(512), [disk])
    loader = load(path)
    assert loader.get_vm_metadata()["mem_gb"] == 1
    assert loader.get_vm_metadata()["cpu"] == 2
    assert loader.get_os_hint() == "linux"
    assert loader.get_nics() == [{"id": "4000", "mac": "00:50:56:aa:bb:cc",
                                  "network": "VM Network"}]
    assert loader.get_source_metadata()["vm_name"] == "web 01/prod"
    assert loader.verify_checksums() == {"disk-2000": True}


@pytest.mark.parametrize("memory_mb, gib", [(1, 1), (1024, 1), (1025, 2), (1536, 2),
                                            (4096, 4), (0, 1)])
def test_mem_gb_rounds_up(memory_mb, gib):
    assert mem_gb(memory_mb) == gib


def test_multi_disk_vm_keeps_boot_order_and_unique_ids(tmp_path):
    disks = [
        exported(tmp_path / "data.vmdk", key="disk 2001", boot_order=None, content=b"data"),
        exported(tmp_path / "boot.vmdk", key="disk 2000", boot_order=1, content=b"boot"),
        exported(tmp_path / "dup.raw", key="disk 2000", boot_order=2, content=b"dup", fmt="raw"),
    ]
    loader = load(write(tmp_path, vm(3000), disks))
    assert [d.id for d in loader.get_disks()] == ["disk-2000", "disk-2000-2", "disk-2001"]
    assert loader.get_boot_disk().local_path == (tmp_path / "boot.vmdk").resolve()
    assert [d.disk_type for d in loader.get_disks()] == ["boot", "data", "data"]
    assert [d.source_format for d in loader.get_disks()] == ["vmdk", "raw", "vmdk"]
    assert loader.get_vm_metadata()["mem_gb"] == 3
    assert set(loader.verify_checksums().values()) == {True}


def test_uefi_secure_boot_windows_vm_loads(tmp_path):
    disk = exported(tmp_path / "c.vhdx", key="", boot_order=0, fmt="vhdx")
    the_vm = vm(8192, firmware="uefi", secure_boot=True, guest_os="windows2019srv_64Guest",
                nics=[])
    loader = load(write(tmp_path, the_vm, [disk]))
    assert loader.get_firmware() == "uefi"
    assert loader.get_secureboot() is True
    assert loader.get_os_hint() == "windows"
    assert [d.id for d in loader.get_disks()] == ["disk0"]


def test_unknown_firmware_is_reported_as_unknown(tmp_path):
    disk = exported(tmp_path / "d.vmdk", key="d", boot_order=0)
    loader = load(write(tmp_path, vm(firmware="efi-something"), [disk]))
    assert loader.get_firmware() == "unknown"


def test_manifest_fields_follow_the_contract(tmp_path):
    disk = exported(tmp_path / "disk0.vmdk", key="disk-2000", boot_order=0, content=b"abc")
    data = json.loads(write(tmp_path, vm(), [disk]).read_text())
    assert data["manifest_version"] == "1.0"
    assert data["disks"][0]["checksum"] == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert data["disks"][0]["bytes"] == 3
    assert data["source"]["export_timestamp"].endswith("Z")
    assert data["metadata"]["job_id"] == "job-1"
    assert data["metadata"]["tags"] == {"production": "true"}
    assert data["pipeline"] == {"fix": {"enabled": False},
                                "convert": {"enabled": True, "compress": True}}
    assert data["output"] == {"format": "qcow2"}


def test_one_manifest_per_disk_names_it_for_the_daemon_and_loads(tmp_path):
    disks = [exported(tmp_path / "data.vmdk", key="disk-2001", boot_order=1, content=b"data"),
             exported(tmp_path / "boot.vmdk", key="disk-2000", boot_order=0, content=b"boot")]
    the_vm = vm()
    singles = per_disk(the_manifest(the_vm, disks, guest_fix=True))
    assert [disk_id for disk_id, _ in singles] == ["disk-2000", "disk-2001"]
    for (disk_id, single), source in zip(singles, ["boot.vmdk", "data.vmdk"]):
        assert single["pipeline"]["load"] == {"source_type": "vmdk",
                                              "source_path": str((tmp_path / source).resolve())}
        assert single["pipeline"]["fix"] == {"enabled": True}
        loader = load(write(tmp_path, the_vm, disks, single, disk_id))
        assert [d.id for d in loader.get_disks()] == [disk_id]


def test_a_disk_the_daemon_cannot_convert_is_refused_before_anything_is_written(tmp_path):
    disks = [exported(tmp_path / "boot.vmdk", key="a", boot_order=0),
             exported(tmp_path / "data.vhdx", key="b", boot_order=1, fmt="vhdx")]
    with pytest.raises(Failed, match=r"data.vhdx is vhdx: the hyper2kvm 0.2.1 daemon converts "
                                     r"vmdk disks only; use auto_convert"):
        per_disk(the_manifest(vm(), disks))


def test_each_attempt_gets_a_new_name_and_no_temp_file_is_left(tmp_path):
    disk = exported(tmp_path / "disk0.vmdk", key="d", boot_order=0)
    first = write(tmp_path, vm(), [disk], disk_id="d")
    second = write(tmp_path, vm(), [disk], disk_id="d")
    assert first != second and first.parent == second.parent
    assert first.name.startswith("web_01_prod-job-1-d-") and first.name.endswith(".json")
    assert sorted(os.listdir(first.parent)) == sorted([first.name, second.name])


def test_unsupported_format_is_refused(tmp_path):
    disk = exported(tmp_path / "d.img", key="d", boot_order=0, fmt="iso")
    with pytest.raises(Failed, match="format 'iso' cannot be handed to hyper2kvm"):
        write(tmp_path, vm(), [disk])


def test_unwritable_watch_dir_is_a_clear_error(tmp_path):
    disk = exported(tmp_path / "d.vmdk", key="d", boot_order=0)
    blocker = tmp_path / "watch"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(NotFound, match=f"hyper2kvm.watch_dir: the configured root {blocker} "
                                       r"is not usable \(Not a directory\)"):
        write(tmp_path, vm(), [disk])
    assert blocker.read_text() == "a file where the directory should be"
