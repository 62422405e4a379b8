"""The KVM end of a migration, shared by the export (Direct Pipeline) and import jobs:
convert the guest when asked (guest_conversion.py), define the domain in libvirt,
saying in the job log which CPU it got and why, and, when asked, start it and wait
until it shows it booted (boot_verify.py). A domain whose boot is not verified is
removed again, so a failed job leaves no domain behind.

On a target (targets.py) the disks are first uploaded into its pool, and the domain
is defined there on those volumes; its boot is verified through the console stream."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from ..redact import redact_url
from .boot_verify import BootCheck, start_and_verify_boot, verify_boot
from .domain_xml import DomainDisk, DomainSpec
from .guest_conversion import convert_guest
from .libvirt_import import import_domain, remove_domain
from .targets import Target, Volume, upload_volume, volume_name

if TYPE_CHECKING:
    from ..job_kinds import JobContext


@dataclass(frozen=True)
class Landing:
    """What the job asked for once the disks are ready. `verify_boot` (the normalised
    {timeout, expect} of boot_verify.parse_verify_boot) implies start."""

    autostart: bool = False
    start: bool = False
    guest_conversion: bool = False
    verify_boot: dict | None = None


async def land(ctx: "JobContext", spec: DomainSpec, landing: Landing,
               target: Target | None = None) -> dict:
    """Land `spec` (its disks local files) at `libvirt.uri`, or on `target`, as `landing`
    asks; the result's `import` section, with `guest_conversion`, `verification` and
    the target's `volumes` when they were made."""
    # the UUID is chosen here, not by libvirt, so that the job records the domain before
    # it exists (a crash then leaves no domain behind: job_output.py)
    spec = replace(spec, uuid=spec.uuid or str(uuid.uuid4()))
    converted = None
    if landing.guest_conversion:
        converted = await convert_guest(ctx, spec)
        ctx.set_stage("import")
    volumes = None
    if target is not None:
        volumes = await upload_disks(ctx, target, spec.name, spec.disks)
        spec = replace(spec, serial_log=None, disks=[
            DomainDisk(Path(v.path), v.format, v.pool, v.name) for v in volumes])
        ctx.set_stage("import")
    result = await _define(ctx, spec, landing, target.uri if target else ctx.config.libvirt.uri)
    if converted is not None:
        result["guest_conversion"] = converted
    if volumes is not None:
        result["target"] = target.name
        result["volumes"] = [volume.to_dict() for volume in volumes]
    return result


async def upload_disks(ctx: "JobContext", target: Target, vm_name: str,
                       disks: list[DomainDisk]) -> list[Volume]:
    """Upload `disks` (local files in the target's format) as volumes `<vm>-disk<N>`."""
    from ..disks.convert import image_info

    volumes = []
    for index, disk in enumerate(disks):
        if disk.format != target.format:
            raise InvalidArgument("disk_path", f"{disk.path} is a {disk.format} image and target "
                                  f"{target.name!r} takes {target.format} volumes: convert it "
                                  "first")
        info = await asyncio.to_thread(image_info, Path(disk.path))
        volumes.append(await upload_volume(
            ctx, target, Path(disk.path), volume_name(vm_name, f"disk{index}", target.format),
            int(info["virtual-size"])))
    return volumes


async def _define(ctx: "JobContext", spec: DomainSpec, landing: Landing, uri: str) -> dict:
    """Define `spec` at `uri`; start it, and verify its boot, when `landing` asks."""
    ctx.log(f"defining domain {spec.name!r} at {redact_url(uri)}")
    ctx.record_domain(uri, spec.uuid, spec.serial_log)
    on_console = spec.serial_log is None and landing.verify_boot is not None
    start = (landing.start or landing.verify_boot is not None) and not on_console
    imported = await import_domain(uri, spec, autostart=landing.autostart, start=start,
                                   cpu_mode=ctx.config.libvirt.cpu_mode)
    ctx.log(f"guest CPU {imported.cpu.describe()}: {imported.cpu.reason}")
    for note in imported.notes:
        ctx.log(note, "warning")
    ctx.log(f"domain {imported.name!r} defined (uuid {imported.uuid})"
            + (", autostart on" if imported.autostart else "")
            + (", started" if imported.started else ""))
    result = imported.to_dict()
    if landing.verify_boot is not None:
        result["verification"] = await _verified(ctx, uri, imported.name, spec,
                                                 BootCheck(**landing.verify_boot))
        result["started"] = True
    return result


async def _verified(ctx: "JobContext", uri: str, name: str, spec: DomainSpec,
                    check: BootCheck) -> dict:
    """verify_boot's result; on failure (or cancel) the domain is stopped and undefined.
    Without a console log file (a target's domain), the domain is started here."""
    try:
        if spec.serial_log is None:
            return await start_and_verify_boot(ctx, uri, name, check)
        return await verify_boot(ctx, uri, name, spec.serial_log, check)
    except BaseException:
        await remove_domain(uri, name)
        ctx.log(f"domain {name!r} stopped and undefined again: its boot was not verified",
                "warning")
        raise
