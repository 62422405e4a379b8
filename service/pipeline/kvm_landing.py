"""The KVM end of a migration, shared by the export (Direct Pipeline) and import jobs:
define the domain in libvirt, saying in the job log which CPU it got and why."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .domain_xml import DomainSpec
from .libvirt_import import import_domain

if TYPE_CHECKING:
    from ..job_kinds import JobContext


@dataclass(frozen=True)
class Landing:
    """What the job asked for once the disks are ready."""

    autostart: bool = False
    start: bool = False


async def land(ctx: "JobContext", spec: DomainSpec, landing: Landing) -> dict:
    """Define `spec` at `libvirt.uri` as `landing` asks; the result's `import` section."""
    uri = ctx.config.libvirt.uri
    ctx.log(f"defining domain {spec.name!r} at {uri}")
    imported = await import_domain(uri, spec, autostart=landing.autostart, start=landing.start,
                                   cpu_mode=ctx.config.libvirt.cpu_mode)
    ctx.log(f"guest CPU {imported.cpu.describe()}: {imported.cpu.reason}")
    for note in imported.notes:
        ctx.log(note, "warning")
    ctx.log(f"domain {imported.name!r} defined (uuid {imported.uuid})"
            + (", autostart on" if imported.autostart else "")
            + (", started" if imported.started else ""))
    return imported.to_dict()
