"""Artifact Manifest v1.0: the file that hands an exported VM to the hyper2kvm daemon.

The contract is `/work/shared/spec/artifact-manifest-v1.md` as hyper2kvm 0.2.1's
loader checks it. The daemon reacts to new `*.json` files, so the manifest is
written in the job's staging directory and lands whole (service/staging.py); each
attempt gets a new name because the daemon never reprocesses a name.
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


def build_manifest(vm: VMInfo, disks: list[ExportedDisk], *, job_id: str, output_dir: Path,
                   output_format: str, compress: bool, export_method: str = "",
                   hypersdk_version: str = "") -> dict:
    """The manifest for one exported VM; the converter writes into `output_dir`."""
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
        "pipeline": {"convert": {"enabled": True, "compress": compress}},
        "output": {"directory": str(output_dir), "format": output_format},
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


def write_manifest(manifest: dict, staging: Staging, vm_name: str) -> Path:
    """Land `manifest` in the staging's directory under a name no earlier attempt used
    (blocking); returns its path."""
    job = safe_name(manifest.get("metadata", {}).get("job_id", ""))
    name = f"{safe_name(vm_name)}-{job}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.json"
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    try:
        staging.write(name, data)
        return staging.land(name)
    except OSError as exc:
        raise Failed(f"cannot write the hyper2kvm manifest into {staging.dest.shown}: "
                     f"{exc.strerror or exc}") from exc


