"""The KVM end of a migration, shared by the export (Direct Pipeline) and import jobs:
convert the guest when asked (guest_conversion.py), define the domain in libvirt,
saying in the job log which CPU it got and why, and, when asked, start it and wait
until it shows it booted (boot_verify.py). A domain whose boot is not verified is
removed again, so a failed job leaves no domain behind."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .boot_verify import BootCheck, verify_boot
from .domain_xml import DomainSpec
from .guest_conversion import convert_guest
from .libvirt_import import import_domain, remove_domain

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


async def land(ctx: "JobContext", spec: DomainSpec, landing: Landing) -> dict:
    """Land `spec` at `libvirt.uri` as `landing` asks; the result's `import` section,
    with `guest_conversion` and `verification` when they ran."""
    uri = ctx.config.libvirt.uri
    # the UUID is chosen here, not by libvirt, so that the job records the domain before
    # it exists (a crash then leaves no domain behind: job_output.py)
    spec = replace(spec, uuid=spec.uuid or str(uuid.uuid4()))
    converted = None
    if landing.guest_conversion:
        converted = await convert_guest(ctx, spec)
        ctx.set_stage("import")
    ctx.log(f"defining domain {spec.name!r} at {uri}")
    ctx.record_domain(uri, spec.uuid, spec.serial_log)
    start = landing.start or landing.verify_boot is not None
    imported = await import_domain(uri, spec, autostart=landing.autostart, start=start,
                                   cpu_mode=ctx.config.libvirt.cpu_mode)
    ctx.log(f"guest CPU {imported.cpu.describe()}: {imported.cpu.reason}")
    for note in imported.notes:
        ctx.log(note, "warning")
    ctx.log(f"domain {imported.name!r} defined (uuid {imported.uuid})"
            + (", autostart on" if imported.autostart else "")
            + (", started" if imported.started else ""))
    result = imported.to_dict()
    if converted is not None:
        result["guest_conversion"] = converted
    if landing.verify_boot is not None:
        result["verification"] = await _verified(ctx, uri, imported.name, spec,
                                                 BootCheck(**landing.verify_boot))
    return result


async def _verified(ctx: "JobContext", uri: str, name: str, spec: DomainSpec,
                    check: BootCheck) -> dict:
    """verify_boot's result; on failure (or cancel) the domain is stopped and undefined."""
    assert spec.serial_log is not None  # both jobs log the console beside the boot disk
    try:
        return await verify_boot(ctx, uri, name, spec.serial_log, check)
    except BaseException:
        await remove_domain(uri, name)
        ctx.log(f"domain {name!r} stopped and undefined again: its boot was not verified",
                "warning")
        raise
