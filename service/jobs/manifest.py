"""Artifact Manifest v1.0: the file that hands an exported VM to the hyper2kvm daemon.

The contract is `/work/shared/spec/artifact-manifest-v1.md` as hyper2kvm 0.2.1's
loader checks it, plus what 0.2.1's manifest workflow daemon really reads
(`hyper2kvm/daemon/manifest_workflow_daemon.py`): only `pipeline.load.source_type`
and `pipeline.load.source_path`, one disk per manifest, VMDK only in practice (its
raw, vhd and vhdx inputs set an argument its local mode never reads; qcow2 is not a
type it knows). So the VM's manifest is split into one manifest per disk
(`per_disk`), each naming its disk in `pipeline.load`.

The daemon reacts to new `*.json` files, so a manifest is written in the job's
staging directory and lands whole (service/staging.py). The file's name without
`.json` is the daemon's job name and its output directory
(`<output_dir>/<date>/<name>/`); each attempt gets a new name because the daemon
never reprocesses a name.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ..errors import Failed
from ..staging import Staging
from ..model import ExportedDisk, VMInfo
from ..kvm.domain_xml import guest_family
from ..disks.ovf_writer import safe_name

MANIFEST_VERSION = "1.0"
SOURCE_FORMATS = ("vmdk", "qcow2", "raw", "vhd", "vhdx", "vdi")
DAEMON_SOURCE_TYPES = ("vmdk",)  # what hyper2kvm 0.2.1's daemon converts (module docstring)
_ID_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def rfc3339(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def mem_gb(memory_mb: int) -> int:
    """Whole GiB, rounded up, at least 1 (512 MiB -> 1, 1536 MiB -> 2)."""
    return max(1, math.ceil(memory_mb / 1024))


def boot_sorted(disks: list[ExportedDisk]) -> list[ExportedDisk]:
    """Disks in boot order: the lowest boot_order first, disks without one after, stable."""
    return sorted(disks, key=lambda d: (d.boot_order is None, d.boot_order or 0))


def disk_ids(disks: list[ExportedDisk]) -> list[str]:
    """Unique ids matching ^[a-zA-Z0-9_-]+$, from each disk's key (or its position)."""
    ids: list[str] = []
    for index, disk in enumerate(disks):
        base = _ID_BAD_CHARS.sub("-", disk.key).strip("-") or f"disk{index}"
        candidate, n = base, 2
        while candidate in ids:
            candidate, n = f"{base}-{n}", n + 1
        ids.append(candidate)
    return ids


def build_manifest(vm: VMInfo, disks: list[ExportedDisk], *, job_id: str, output_format: str,
                   compress: bool, guest_fix: bool, export_method: str = "",
                   hypersdk_version: str = "") -> dict:
    """The manifest for one exported VM; `guest_fix` asks for hyper2kvm's fix stage."""
    if not disks:
        raise Failed(f"VM {vm.name!r}: no exported disks to hand off")
    ordered = boot_sorted(disks)
    now = rfc3339()
    manifest_disks = []
    for position, (disk, disk_id) in enumerate(zip(ordered, disk_ids(ordered))):
        manifest_disks.append(_disk_entry(disk, disk_id, position))
    firmware = vm.firmware if vm.firmware in ("bios", "uefi") else "unknown"
    return {
        "manifest_version": MANIFEST_VERSION,
        "source": {"provider": vm.provider, "vm_id": vm.identifier, "vm_name": vm.name,
                   "datacenter": vm.datacenter, "export_timestamp": now,
                   "export_method": export_method},
        "vm": {"cpu": max(1, vm.cpus), "mem_gb": mem_gb(vm.memory_mb), "firmware": firmware,
               "secureboot": bool(vm.secure_boot), "os_hint": guest_family(vm.guest_os),
               "os_version": vm.guest_os},
        "nics": [{"id": nic.key or f"nic{i}", "mac": nic.mac, "network": nic.network}
                 for i, nic in enumerate(vm.nics)],
        "disks": manifest_disks,
        "pipeline": {"fix": {"enabled": guest_fix},
                     "convert": {"enabled": True, "compress": compress}},
        "output": {"format": output_format},
        "metadata": {"hypersdk_version": hypersdk_version, "job_id": job_id, "created_at": now,
                     "tags": {tag: "true" for tag in vm.tags}},
    }


def _disk_entry(disk: ExportedDisk, disk_id: str, position: int) -> dict:
    if disk.format not in SOURCE_FORMATS:
        raise Failed(f"disk {disk.path}: format {disk.format!r} cannot be handed to hyper2kvm "
                     f"(it reads {', '.join(SOURCE_FORMATS)})")
    entry = {"id": disk_id, "source_format": disk.format, "bytes": int(disk.file_bytes),
             "local_path": str(Path(disk.path).resolve()),
             "boot_order_hint": position, "disk_type": "boot" if position == 0 else "data",
             "label": disk.label or disk_id}
    digest = disk.sha256.lower()
    if _SHA256_RE.match(digest):
        entry["checksum"] = "sha256:" + digest
    return entry


def per_disk(manifest: dict) -> list[tuple[str, dict]]:
    """(disk id, manifest) for each disk of a VM's manifest, each listing that one disk
    and naming it in `pipeline.load`, as hyper2kvm 0.2.1's daemon converts one disk
    per manifest. Raises Failed before anything is written when a disk is of a type
    that daemon cannot convert."""
    for entry in manifest["disks"]:
        if entry["source_format"] not in DAEMON_SOURCE_TYPES:
            raise Failed(f"disk {entry['local_path']} is {entry['source_format']}: the hyper2kvm "
                         f"0.2.1 daemon converts {', '.join(DAEMON_SOURCE_TYPES)} disks only; "
                         "use auto_convert (daemon_mode: false) for the built-in converter")
    return [(entry["id"], {**manifest, "disks": [entry],
                           "pipeline": {**manifest["pipeline"],
                                        "load": {"source_type": entry["source_format"],
                                                 "source_path": entry["local_path"]}}})
            for entry in manifest["disks"]]


def manifest_name(vm_name: str, job_id: str, disk_id: str) -> str:
    """A name no earlier attempt used: it names the VM, the job and the disk."""
    return (f"{safe_name(vm_name)}-{safe_name(job_id)}-{disk_id}-"
            f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}.json")


def write_manifest(manifest: dict, staging: Staging, name: str) -> Path:
    """Land `manifest` as `name` in the staging's directory (blocking); returns its path."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    try:
        staging.write(name, data)
        return staging.land(name)
    except OSError as exc:
        raise Failed(f"cannot write the hyper2kvm manifest into {staging.dest.shown}: "
                     f"{exc.strerror or exc}") from exc
