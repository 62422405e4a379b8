"""The "import" job: define a VM in libvirt from disk images that are already converted.

The definition is the spec's `/import-to-kvm` body — vm_name, disk_path (or
disk_paths, boot disk first), memory_mb, vcpus, network, autostart — plus the
optional firmware, os_type, uuid, start, guest_conversion (virt-v2v-in-place on the
disks, in place, before the define) and verify_boot (true or {timeout, expect}: start
and wait until the guest booted). `network: ""` means no NIC. The libvirt
URI comes from the config (`libvirt.uri`), never from the caller.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..job_kinds import JobContext, JobKind, SubmitContext, register
from .boot_verify import parse_verify_boot
from .convert import detect_format
from .domain_xml import (DISK_FORMATS, DomainDisk, DomainNic, DomainSpec, check_spec,
                         serial_log_beside)
from .kvm_landing import Landing, land
from .libvirt_import import preflight

_FIELDS: dict[str, type] = {
    "vm_name": str, "disk_path": str, "disk_paths": list, "memory_mb": int, "vcpus": int,
    "network": str, "autostart": bool, "start": bool, "firmware": str, "os_type": str,
    "uuid": str, "guest_conversion": bool, "verify_boot": object,
}
_REQUIRED = ("vm_name", "memory_mb")


class ImportKind(JobKind):
    name = "import"
    operation = "import"
    polkit_action = "org.hypersdk.HyperSDK1.import"

    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        if not isinstance(definition, dict):
            raise InvalidArgument("definition", "an object")
        for key, value in definition.items():
            expected = _FIELDS.get(key)
            if expected is None:
                known = ", ".join(sorted(_FIELDS))
                raise InvalidArgument(key, f"unknown field (known: {known})")
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise InvalidArgument(key, f"a {_TYPE_NAMES[expected]}")
        for key in _REQUIRED:
            if key not in definition:
                raise InvalidArgument(key, "required")
        result = {
            "vm_name": definition["vm_name"],
            "disk_paths": _disk_paths(definition),
            "memory_mb": definition["memory_mb"],
            "vcpus": definition.get("vcpus", 1),
            "network": definition.get("network", submit.config.libvirt.network),
            "autostart": definition.get("autostart", False),
            "start": definition.get("start", False),
            "firmware": definition.get("firmware", "bios"),
            "os_type": definition.get("os_type", "unknown"),
            "uuid": definition.get("uuid", ""),
            "guest_conversion": definition.get("guest_conversion", False),
            "verify_boot": parse_verify_boot(definition.get("verify_boot"), "verify_boot"),
        }
        check_spec(_spec(result, formats=["raw"] * len(result["disk_paths"])))
        return result

    async def run(self, ctx: JobContext) -> dict:
        definition = ctx.definition
        uri = ctx.config.libvirt.uri
        ctx.set_stage("import")
        await preflight(uri, definition["vm_name"], definition["uuid"],
                        [definition["network"]] if definition["network"] else [])
        formats = [await asyncio.to_thread(detect_format, Path(path))
                   for path in definition["disk_paths"]]
        for path, fmt in zip(definition["disk_paths"], formats):
            if fmt not in DISK_FORMATS:
                raise InvalidArgument("disk_path", f"{path} is a {fmt} image; convert it to "
                                      "qcow2 or raw first")
        return await land(ctx, _spec(definition, formats),
                          Landing(definition["autostart"], definition["start"],
                                  definition["guest_conversion"], definition["verify_boot"]))

    def describe(self, definition: dict) -> dict:
        return {"vm": definition.get("vm_name", ""), "provider": "libvirt"}


_TYPE_NAMES = {str: "string", list: "list of strings", int: "integer", bool: "true or false",
               object: "value"}


def _disk_paths(definition: dict) -> list[str]:
    if ("disk_path" in definition) == ("disk_paths" in definition):
        raise InvalidArgument("disk_path", "give exactly one of disk_path or disk_paths")
    paths = definition.get("disk_paths") or [definition.get("disk_path")]
    field = "disk_paths" if "disk_paths" in definition else "disk_path"
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidArgument(field, "one or more file paths")
    for path in paths:
        if not Path(path).is_absolute():
            raise InvalidArgument(field, f"{path!r} is not an absolute path")
        if not Path(path).is_file():
            raise InvalidArgument(field, f"{path} does not exist")
    return paths


def _spec(definition: dict, formats: list[str]) -> DomainSpec:
    network = definition["network"]
    return DomainSpec(
        name=definition["vm_name"], memory_mb=definition["memory_mb"], vcpus=definition["vcpus"],
        disks=[DomainDisk(Path(p), f) for p, f in zip(definition["disk_paths"], formats)],
        nics=[DomainNic(network)] if network else [], uuid=definition["uuid"],
        firmware=definition["firmware"], os_family=definition["os_type"],
        serial_log=serial_log_beside(Path(definition["disk_paths"][0]), definition["vm_name"]))


register(ImportKind())
