"""OVAs and OVFs written by our own writer (disks/ovf_writer.py) from real VMDKs,
placed in an import directory the config allows."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.disks import ovf_writer
from hypersdk.service.model import DiskInfo, ExportedDisk, NicInfo, VMInfo
from hypersdk.service.providers.ova import OvaProvider


@dataclass
class Package:
    ova: Path
    raws: list[Path]          # the content of each disk, as raw images


def make_vmdk(directory: Path, name: str, size: int) -> tuple[Path, Path]:
    """A streamOptimized VMDK holding random data in its first MiB; returns (vmdk, raw)."""
    raw = directory / f"{name}.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size)
        handle.write(os.urandom(1 << 20))
    vmdk = directory / f"{name}.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(raw), str(vmdk)], check=True)
    return vmdk, raw


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_package(directory: Path, name: str, *, as_ova: bool = True) -> Package:
    """Package a two-disk VM the way the export job does: .ovf, .mf, disks (.ova or not)."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-src-", dir=directory.parent))
    disks, raws = [], []
    for index, size in enumerate((8 << 20, 4 << 20)):
        vmdk, raw = make_vmdk(work, f"{name}-disk{index + 1}", size)
        raws.append(raw)
        disks.append(ExportedDisk(path=vmdk, format="vmdk", capacity_bytes=size,
                                  file_bytes=vmdk.stat().st_size, sha256=sha256(vmdk),
                                  boot_order=index + 1 if index == 0 else None,
                                  label=f"Hard disk {index + 1}", key=f"disk-{index}"))
    vm = VMInfo(identifier=name, name=name, provider="test", cpus=2, memory_mb=2048,
                firmware="uefi", guest_os="Debian 12",
                disks=[DiskInfo(key=d.key, label=d.label, capacity_bytes=d.capacity_bytes,
                                controller="scsi", boot_order=d.boot_order) for d in disks],
                nics=[NicInfo(key="nic-0", mac="00:50:56:aa:bb:cc", network="VM Network",
                              adapter="vmxnet3")])
    out = directory if not as_ova else work
    descriptor = out / f"{name}.ovf"
    data = ovf_writer.build_ovf(vm, disks, remove_cdrom=True)
    descriptor.write_bytes(data)
    digests = {descriptor.name: hashlib.sha256(data).hexdigest(),
               **{d.path.name: d.sha256 for d in disks}}
    manifest = out / f"{name}.mf"
    manifest.write_bytes(ovf_writer.manifest_text(digests))
    if as_ova:
        ova = directory / f"{name}.ova"
        ovf_writer.write_ova(ova, [descriptor, manifest, *(d.path for d in disks)], lambda n: None,
                             threading.Event())
        return Package(ova, raws)
    for disk in disks:
        os.replace(disk.path, out / disk.path.name)
    return Package(descriptor, raws)


@pytest.fixture
def imports(tmp_path) -> Path:
    directory = tmp_path / "imports"
    directory.mkdir()
    return directory


@pytest.fixture
def provider(imports) -> OvaProvider:
    config = parse_config({"ova": {"import_dirs": [str(imports)]}}, "test")
    return OvaProvider("ova", {"type": "ova", "enabled": True}, config)
