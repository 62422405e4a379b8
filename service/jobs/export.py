"""The "export" job: a VM's disks out of a provider, packaged as OVA, OVF or plain disks.

The definition is the spec's `/jobs/submit` body. Everything that can be checked
without touching the provider is checked at submit time: unknown fields, the
provider being usable, the options, the hyper2kvm_integration block, and the
export_path, which must resolve (symlinks included) to a directory under
`export.base_path`.

A run downloads the disks into a hidden staging directory inside export_path
(so final renames stay on one filesystem), then packages them:
- `ova`: `<vm>.ova`, a tar of `<vm>.ovf` (first), `<vm>.mf` and the disks;
- `ovf`: `<vm>.ovf`, `<vm>.mf` and the disk files;
- `disk`: the disk files and `<vm>.mf`.
OVA/OVF packages carry VMDKs: disks in other formats (raw, vhd, ... from the
cloud providers) are rewritten as stream-optimized VMDKs with qemu-img, and with
`options.compress` so are VMDKs that are not stream-optimized yet. Finally the
hyper2kvm hand-off runs when the definition enables it (with import_to_kvm, libvirt
is asked whether the VM can be imported before anything downloads); with the Direct
Pipeline, disks a provider streams are converted while they download (`overlap.py`). Output
files are registered for cleanup until the job completes, so a failed or cancelled
export leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..confine import OpenDir, open_dir, split_under
from ..errors import AlreadyExists, Failed, InvalidArgument
from ..files import temp_path_for
from ..definitions import JsonObject
from ..job_kinds import JobContext, JobKind, SubmitContext, register
from ..staging import Staging
from ..model import ExportOptions, ExportedDisk, VMInfo
from ..kvm import guest_conversion
from . import handoff
from . import overlap
from . import warm
from ..disks import ovf_writer
from ..disks.ovf_writer import safe_name
from ..disks.convert import run_qemu_img_convert
from ..disks.diskspace import check_free_space
from ..disks.download import file_sha256
from ..disks.threads import from_any_thread, run_stoppable

METHODS = ("ova", "ovf", "disk")
FIELDS = ("vm_identifier", "provider", "export_method", "export_path", "options",
          "hyper2kvm_integration", "warm", "precopy_interval", "cutover_at")
BOOL_OPTIONS = {"shutdown_vm": False, "restore_power_state": False, "remove_cdrom": True,
                "compress": False}
DEFAULT_SHUTDOWN_TIMEOUT = 300.0
QEMU_INPUT_FORMATS = {"vmdk": "vmdk", "raw": "raw", "vhd": "vpc", "vhdx": "vhdx", "qcow2": "qcow2"}


def _check_options(options: Any) -> dict:
    fields = JsonObject({} if options is None else options,
                        [*BOOL_OPTIONS, "shutdown_timeout", "provider_options"], "options.")
    result: dict[str, Any] = {key: fields.flag(key, default)
                              for key, default in BOOL_OPTIONS.items()}
    result["shutdown_timeout"] = fields.number("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT,
                                               above=0, unit="seconds")
    # passed to the provider as ExportOptions.extra; the provider checks its keys
    # (e.g. AWS base_snapshot_ids, keep_snapshots) and names any it does not know
    provider_options = fields.mapping("provider_options", None)
    if provider_options is not None:
        if "shutdown_timeout" in provider_options:
            raise InvalidArgument("options.provider_options.shutdown_timeout",
                                  "belongs in options.shutdown_timeout")
        result["provider_options"] = provider_options
    if result["restore_power_state"] and not result["shutdown_vm"]:
        raise InvalidArgument("options.restore_power_state", "needs shutdown_vm: true")
    return result


def resolve_export_path(value: Any, base_path: str) -> Path:
    """The absolute export directory for `value`, which must stay under base_path.

    A relative value is taken relative to base_path; `..` components are refused
    outright and the base itself is not an export directory. Below the base the
    directory is opened by the kernel beneath it (service/confine.py), so a symlink
    cannot lead elsewhere either.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument("export_path", "a non-empty path under export.base_path")
    candidate = value if os.path.isabs(value) else os.path.join(base_path, value)
    root, relative = split_under(candidate, [base_path], "export_path", "export.base_path")
    if not relative:
        raise InvalidArgument("export_path", f"must lie inside export.base_path ({root}), "
                                             "not be the base itself")
    return root / relative


def _open_export_dir(definition: dict, base_path: str) -> OpenDir:
    path = resolve_export_path(definition["export_path"], base_path)
    return open_dir(Path(base_path), str(path.relative_to(base_path)), "export_path",
                    create=True)


class ExportKind(JobKind):
    name = "export"
    operation = "export"
    polkit_action = "org.hypersdk.HyperSDK1.export"
    export_slot = True

    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        fields = JsonObject(definition, FIELDS)
        vm_identifier = fields.text("vm_identifier", non_empty=True)
        provider = fields.text("provider", non_empty=True)
        submit.providers.check_usable(provider)
        method = fields.text("export_method", "ova", choices=METHODS)
        base = submit.config.export.base_path
        export_path = definition.get("export_path", safe_name(vm_identifier))
        return {
            **warm.check_definition(fields, submit.providers.warm_unsupported(provider)),
            "vm_identifier": vm_identifier.strip(),
            "provider": provider,
            "export_method": method,
            "export_path": str(resolve_export_path(export_path, base)),
            "options": _check_options(definition.get("options")),
            "hyper2kvm_integration": handoff.validate_integration(
                definition.get("hyper2kvm_integration"), submit.config),
        }

    async def run(self, ctx: JobContext) -> dict:
        streaming = overlap.StreamConversions(ctx)
        try:
            return await self._run(ctx, streaming)
        finally:
            await streaming.close()

    async def _run(self, ctx: JobContext, streaming: overlap.StreamConversions) -> dict:
        definition = ctx.definition
        method = definition["export_method"]
        provider = await ctx.providers.get(definition["provider"])
        ctx.set_stage("discovery")
        vm = await provider.get_vm(definition["vm_identifier"])
        await handoff.preflight_import(ctx.config, vm, definition["hyper2kvm_integration"])
        dest = await asyncio.to_thread(_open_export_dir, definition,
                                       ctx.config.export.base_path)
        staging = ctx.staging(dest)
        ctx.log(f"exporting {vm.name} ({vm.identifier}, {len(vm.disks)} disk(s)) as {method} "
                f"to {dest.shown}")
        _refuse_existing(staging, _package_names(vm, method))
        disk_bytes = sum(d.capacity_bytes for d in vm.disks)
        ctx.plan(_plan(disk_bytes, method, definition["hyper2kvm_integration"],
                       definition.get("warm", False)))
        needed = disk_bytes * (2 if method == "ova" else 1)
        check_free_space(staging.path, needed, f"exporting {vm.name} as {method}",
                         shown=dest.shown)
        await handoff.enable_streaming(ctx, vm, definition["hyper2kvm_integration"], streaming)
        precopied = None
        if definition.get("warm"):
            vm, disks, precopied = await _warm_export(ctx, provider, vm, staging)
        else:
            ctx.set_stage("export")
            vm, disks = await provider.export_disks(
                vm.identifier, staging.path, _export_options(definition, ctx, streaming), ctx)
        ctx.set_stage("package")
        if method in ("ova", "ovf"):
            compress = definition["options"]["compress"]
            disks = [await to_ovf_disk(ctx, disk, compress) for disk in disks]
        outputs = await _package(ctx, vm, disks, method, staging,
                                 definition["options"]["remove_cdrom"],
                                 definition["hyper2kvm_integration"]["enabled"])
        integration = await handoff.run_integration(ctx, vm, disks, dest.shown,
                                                    definition["hyper2kvm_integration"],
                                                    streaming, landed=outputs["disks"])
        result = _result(vm, method, dest.shown, outputs, integration)
        if precopied is not None:
            result.update(_warm_summary(ctx, precopied))
        return result


async def _warm_export(ctx: JobContext, provider, vm: VMInfo,
                       staging: Staging) -> tuple[VMInfo, list[ExportedDisk], warm.WarmResult]:
    """Pre-copy rounds until cutover (jobs/warm.py); the disks as raw images in staging."""
    definition = ctx.definition
    cutover_at = definition["cutover_at"]
    settings = warm.WarmSettings(
        precopy_interval=definition["precopy_interval"],
        cutover_at=datetime.fromisoformat(cutover_at).timestamp() if cutover_at else None)
    ctx.log(f"warm migration: a pre-copy round every {settings.precopy_interval:g}s until "
            f"cutover ({cutover_at or 'a Cutover call'})")
    source = await provider.warm_source(vm.identifier, _export_options(definition, ctx, None),
                                        ctx)
    names = [f"{safe_name(vm.name)}-disk{index + 1}.raw" for index in range(len(vm.disks))]
    _refuse_existing(staging, names)
    try:
        result = await warm.run_warm(source, staging.path, names, ctx.checkpoints, settings,
                                     ctx.cutover, ctx, ctx.job_id, set_stage=ctx.set_stage)
    finally:
        await source.close()
    return source.vm, result.disks, result


def _warm_summary(ctx: JobContext, precopied: warm.WarmResult) -> dict:
    """The rounds and the downtime: from the shutdown request to the end of the job."""
    downtime = round(time.time() - precopied.shutdown_requested, 3)
    ctx.log(f"downtime {downtime:.1f}s (from the shutdown request to the end of the job); "
            f"{len(precopied.rounds)} round(s): "
            + ", ".join(f"{r['bytes']} bytes in {r['seconds']:g}s" for r in precopied.rounds))
    return {"warm": True, "downtime_seconds": downtime, "rounds": precopied.rounds}


def _plan(disk_bytes: int, method: str, integration: dict,
          warm_export: bool = False) -> dict[str, int]:
    """Estimated bytes of each stage, from the disks' capacity (progress.py): the
    download, re-writing and packing into OVF/OVA, the built-in conversion and
    virt-v2v's guest conversion."""
    stages = {"precopy round 1" if warm_export else "export": disk_bytes}
    if method in ("ova", "ovf"):
        stages["package"] = disk_bytes
    if integration["enabled"] and not integration["daemon_mode"]:
        stages["convert"] = disk_bytes
        if integration["guest_conversion"]:
            stages[guest_conversion.STAGE] = disk_bytes
    return stages


def _export_options(definition: dict, ctx: JobContext,
                    streaming: overlap.StreamConversions | None) -> ExportOptions:
    options = definition["options"]
    return ExportOptions(shutdown_vm=options["shutdown_vm"],
                         restore_power_state=options["restore_power_state"],
                         remove_cdrom=options["remove_cdrom"], compress=options["compress"],
                         chunk_size=ctx.config.export.chunk_size,
                         max_retries=ctx.config.export.max_retries,
                         parallel_disks=ctx.config.export.parallel_disks,
                         extra={**options.get("provider_options", {}),
                                "shutdown_timeout": options["shutdown_timeout"]},
                         stream_consumer=streaming if streaming and streaming.enabled else None,
                         checkpoints=ctx.checkpoints)


def _package_names(vm: VMInfo, method: str) -> list[str]:
    """The files a package adds besides the disks (whose names the provider chooses)."""
    stem = safe_name(vm.name)
    return {"ova": [f"{stem}.ova"], "ovf": [f"{stem}.ovf", f"{stem}.mf"],
            "disk": [f"{stem}.mf"]}[method]


def _refuse_existing(staging: Staging, names: list[str]) -> None:
    """Fail early for names that landing would refuse at the end (after the download)."""
    existing = [name for name in names if staging.dest.holds(name)]
    if existing:
        raise AlreadyExists(f"{staging.dest.shown} already holds {', '.join(existing)}; "
                            f"remove it or choose another export_path")


async def _package(ctx: JobContext, vm: VMInfo, disks: list[ExportedDisk], method: str,
                   staging: Staging, remove_cdrom: bool, keep_disks: bool) -> dict:
    """Write descriptor, manifest and archive in staging and land the package; return the
    landed files and disks (where others find them)."""
    stem = safe_name(vm.name)
    digests = {}
    descriptor = staging.path / f"{stem}.ovf"
    if method in ("ova", "ovf"):
        data = await asyncio.to_thread(ovf_writer.build_ovf, vm, disks, remove_cdrom=remove_cdrom)
        await asyncio.to_thread(staging.write, descriptor.name, data)
        digests[descriptor.name] = hashlib.sha256(data).hexdigest()
    digests.update({d.path.name: d.sha256 for d in disks})
    manifest = staging.path / f"{stem}.mf"
    await asyncio.to_thread(staging.write, manifest.name, ovf_writer.manifest_text(digests))
    ctx.log(f"manifest {manifest.name}: SHA-256 of {len(digests)} file(s)")
    if method == "ova":
        ova = staging.path / f"{stem}.ova"
        members = [descriptor, manifest, *(d.path for d in disks)]
        ctx.add_total(sum(member.stat().st_size for member in members))
        await _write_ova(ctx, ova, members)
        landed_ova = await asyncio.to_thread(staging.land, ova.name)
        ctx.log(f"wrote {ova.name} ({ova.stat().st_size} bytes)")
        files, landed = [landed_ova], disks
        if keep_disks:  # the hand-off reads disk files, not the archive
            landed = await _land_disks(staging, disks)
            files += [d.path for d in landed]
        return {"files": files, "disks": landed, "ova": landed_ova, "ovf": None,
                "manifest": None}
    landed = await _land_disks(staging, disks)
    finals = [await asyncio.to_thread(staging.land, source.name)
              for source in ([manifest] if method == "disk" else [descriptor, manifest])]
    return {"files": [*finals, *(d.path for d in landed)], "disks": landed, "ova": None,
            "ovf": finals[0] if method == "ovf" else None, "manifest": finals[-1]}


async def to_ovf_disk(ctx: JobContext, disk: ExportedDisk, compress: bool) -> ExportedDisk:
    """The disk as an OVF package carries it: a VMDK. Other formats (raw, vhd, ...) become
    stream-optimized VMDKs; a VMDK is rewritten as stream-optimized only for `compress`."""
    if disk.format == "vmdk" and (not compress or
                                  ovf_writer.vmdk_create_type(disk.path) == "streamOptimized"):
        return disk
    if disk.format not in QEMU_INPUT_FORMATS:
        raise Failed(f"{disk.path.name}: cannot put a {disk.format} disk into an OVF package")
    target = disk.path.with_suffix(".vmdk")
    temp = temp_path_for(target)
    ctx.add_total(disk.capacity_bytes)
    done = 0

    def on_fraction(fraction: float) -> None:
        nonlocal done
        now = int(fraction * disk.capacity_bytes)
        ctx.advance(now - done)
        done = now

    ctx.log(f"writing {disk.path.name} as a stream-optimized VMDK")
    try:
        await run_qemu_img_convert(disk.path, QEMU_INPUT_FORMATS[disk.format], temp, "vmdk",
                                   False, on_fraction, out_options="subformat=streamOptimized")
        await asyncio.to_thread(os.replace, temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if target != disk.path:
        disk.path.unlink()
    on_fraction(1.0)
    size, digest = await run_stoppable(lambda stop: file_sha256(target, stop=stop))
    ctx.log(f"{target.name}: {size} bytes (was {disk.file_bytes})")
    return dataclasses.replace(disk, path=target, format="vmdk", file_bytes=size, sha256=digest)


async def _write_ova(ctx: JobContext, ova: Path, members: list[Path]) -> None:
    on_bytes = from_any_thread(ctx.advance)
    await run_stoppable(lambda stop: ovf_writer.write_ova(ova, members, on_bytes, stop))


async def _land_disks(staging: Staging, disks: list[ExportedDisk]) -> list[ExportedDisk]:
    _refuse_existing(staging, [disk.path.name for disk in disks])
    return [dataclasses.replace(disk, path=await asyncio.to_thread(staging.land, disk.path.name))
            for disk in disks]


def _disk_entry(disk: ExportedDisk, ova: Path | None) -> dict:
    """A disk of the result; one that exists only inside the OVA is named by its member name."""
    inside = ova is not None and disk.path.parent != ova.parent
    return {"path": disk.path.name if inside else str(disk.path),
            "archive": str(ova) if inside else None, "format": disk.format,
            "bytes": disk.file_bytes, "capacity_bytes": disk.capacity_bytes,
            "sha256": disk.sha256, "label": disk.label}


def _result(vm: VMInfo, method: str, export_dir: Path, outputs: dict, integration: dict) -> dict:
    return {
        "vm": vm.to_dict(),
        "export_method": method,
        "export_dir": str(export_dir),
        "files": [str(p) for p in outputs["files"]],
        "disks": [_disk_entry(d, outputs["ova"]) for d in outputs["disks"]],
        "ova": str(outputs["ova"]) if outputs["ova"] else None,
        "ovf": str(outputs["ovf"]) if outputs["ovf"] else None,
        "manifest": str(outputs["manifest"]) if outputs["manifest"] else None,
        "hyper2kvm": integration,
    }


register(ExportKind())
