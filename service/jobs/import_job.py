"""The "import" job: define a VM in libvirt from disk images that are already converted.

The definition is the spec's `/import-to-kvm` body — vm_name, disk_path (or
disk_paths, boot disk first), memory_mb, vcpus, network, autostart — plus the
optional firmware, os_type, uuid, start, disk_format (say "raw" to import raw
disks: service/disks/disk_format.py), guest_conversion (virt-v2v-in-place on the
disks, in place, before the define) and verify_boot (true or {timeout, expect}: start
and wait until the guest booted). `network: ""` means no NIC. The libvirt URI comes
from the config (`libvirt.uri`), never from the caller; `target` names one of the
config's targets instead (kvm/targets.py): the disks, in the target's format, are
uploaded into its pool as `<vm_name>-disk<N>.<format>` and the domain is defined there.

Disks must lie inside `paths.sources` and in a directory only root can change:
libvirt and QEMU open a disk by its path (and libvirt hands it to the QEMU user), so
a path through a directory others can write could be pointed at any file on the
host after it was checked. /convert's output directories qualify.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ..confine import check_source, open_source, real_path
from ..definitions import JsonObject
from ..errors import InvalidArgument
from ..job_kinds import JobContext, JobKind, SubmitContext, register
from ..kvm.boot_verify import parse_verify_boot
from ..disks.convert import image_info
from ..disks.disk_format import check_claimed_format
from ..kvm.domain_xml import (DISK_FORMATS, DomainDisk, DomainNic, DomainSpec, check_spec,
                         serial_log_beside)
from ..kvm.kvm_landing import Landing, land
from ..kvm.libvirt_import import check_disk_for_libvirt, preflight
from ..kvm.targets import find_target, preflight_target, volume_name

_FIELDS = ("vm_name", "disk_path", "disk_paths", "memory_mb", "vcpus", "network", "autostart",
           "start", "firmware", "os_type", "uuid", "disk_format", "guest_conversion",
           "verify_boot", "target")
MAX_MEMORY_MB = 16 << 20  # 16 TiB, QEMU's x86_64 limit is above what any host has
MAX_VCPUS = 4096


class ImportKind(JobKind):
    name = "import"
    operation = "import"
    polkit_action = "org.hypersdk.HyperSDK1.import"

    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        fields = JsonObject(definition, _FIELDS)
        result = {
            "vm_name": fields.text("vm_name"),
            "disk_paths": _disk_paths(definition, submit.config.paths.sources),
            "memory_mb": fields.integer("memory_mb", minimum=1, maximum=MAX_MEMORY_MB),
            "vcpus": fields.integer("vcpus", 1, minimum=1, maximum=MAX_VCPUS),
            "network": fields.text("network", submit.config.libvirt.network),
            "autostart": fields.flag("autostart", False),
            "start": fields.flag("start", False),
            "firmware": fields.text("firmware", "bios"),
            "os_type": fields.text("os_type", "unknown"),
            "uuid": fields.text("uuid", ""),
            "disk_format": fields.text("disk_format", "", choices=("", *DISK_FORMATS)),
            "guest_conversion": fields.flag("guest_conversion", False),
            "verify_boot": parse_verify_boot(definition.get("verify_boot"), "verify_boot"),
        }
        target = find_target(submit.config, definition.get("target"), "target")
        if target is not None:
            result["target"] = target.name
        if result["memory_mb"] > MAX_MEMORY_MB:
            raise InvalidArgument("memory_mb", f"an integer from 1 to {MAX_MEMORY_MB}")
        if result["vcpus"] > MAX_VCPUS:
            raise InvalidArgument("vcpus", f"an integer from 1 to {MAX_VCPUS}")
        check_spec(_spec(result, formats=["raw"] * len(result["disk_paths"])))
        return result

    async def run(self, ctx: JobContext) -> dict:
        definition = ctx.definition
        target = find_target(ctx.config, definition.get("target"), "target")
        ctx.set_stage("import")
        await preflight(target.uri if target else ctx.config.libvirt.uri, definition["vm_name"],
                        definition["uuid"],
                        [definition["network"]] if definition["network"] else [])
        disks = [await asyncio.to_thread(_checked_disk, path, ctx.config.paths.sources,
                                         definition["disk_format"])
                 for path in definition["disk_paths"]]
        if target is not None:
            await preflight_target(target, [volume_name(definition["vm_name"], f"disk{i}",
                                                        target.format)
                                            for i in range(len(disks))])
        definition = {**definition, "disk_paths": [str(path) for path, _fmt in disks]}
        return await land(ctx, _spec(definition, [fmt for _p, fmt in disks]),
                          Landing(definition["autostart"], definition["start"],
                                  definition["guest_conversion"], definition["verify_boot"]),
                          target)

    def describe(self, definition: dict) -> dict:
        return {"vm": definition.get("vm_name", ""), "provider": "libvirt"}


def _disk_paths(definition: dict, roots: list[str]) -> list[str]:
    if ("disk_path" in definition) == ("disk_paths" in definition):
        raise InvalidArgument("disk_path", "give exactly one of disk_path or disk_paths")
    paths = definition.get("disk_paths") or [definition.get("disk_path")]
    field = "disk_paths" if "disk_paths" in definition else "disk_path"
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidArgument(field, "one or more file paths")
    return [check_source(path, roots, field) for path in paths]


def _checked_disk(value: str, roots: list[str], claimed: str) -> tuple[Path, str]:
    """(real path, format) of a disk libvirt may be given by path (module docstring)."""
    with open_source(value, roots, "disk_path") as disk:
        path = real_path(disk.dir_fd) / disk.name
        check_disk_for_libvirt(path)
        info = image_info(disk.dir_path)
        check_claimed_format(info["format"], int(info["virtual-size"]), disk.name, claimed,
                             "disk_path", "disk_format")
        if info["format"] not in DISK_FORMATS:
            raise InvalidArgument("disk_path", f"{disk.shown} is a {info['format']} image; "
                                  "convert it to qcow2 or raw first")
        return path, info["format"]


def _spec(definition: dict, formats: list[str]) -> DomainSpec:
    network = definition["network"]
    return DomainSpec(
        name=definition["vm_name"], memory_mb=definition["memory_mb"], vcpus=definition["vcpus"],
        disks=[DomainDisk(Path(p), f) for p, f in zip(definition["disk_paths"], formats)],
        nics=[DomainNic(network)] if network else [], uuid=definition["uuid"],
        firmware=definition["firmware"], os_family=definition["os_type"],
        serial_log=serial_log_beside(Path(definition["disk_paths"][0]), definition["vm_name"]))


register(ImportKind())
