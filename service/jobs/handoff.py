"""What an export job does after the disks are out: the `hyper2kvm_integration` block.

Three modes, chosen by the job definition:
- `enabled: false` (the default): export only.
- `daemon_mode: true`: hand the VM to hyper2kvm@<instance>, hyper2kvm 0.2.1's
  manifest workflow daemon (data/systemd/hyper2kvm@.service): one Artifact Manifest
  per disk lands in `<hyper2kvm.watch_dir>/<instance>/to_be_processed/`, and the job
  follows the daemon's markers until each disk is converted into
  `<hyper2kvm.output_dir>/<date>/<manifest name>/` (jobs/hyper2kvm.py). When the
  unit is not active, `auto_convert: true` converts here instead (with a warning);
  otherwise the manifests stay for the daemon and the job ends "handed off".
- `auto_convert: true` (without daemon mode): the spec's "Direct Pipeline" — convert
  every disk with the built-in converter into `<hyper2kvm.output_dir>/<vm>/` and, when
  `import_to_kvm` is set, define the domain in libvirt; with `target`, upload the disks
  into the target's pool instead and define the domain there. Disks that arrive as
  streamOptimized VMDKs are converted while they download (`enable_streaming`,
  `jobs/overlap.py`); the others after the export.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..confine import open_dir, split_under
from ..definitions import JsonObject
from ..disks.ovf_writer import safe_name
from ..errors import AlreadyExists, InvalidArgument
from ..kvm.boot_verify import parse_verify_boot
from ..kvm.domain_xml import (DomainDisk, DomainNic, DomainSpec, guest_family, is_uuid,
                              serial_log_beside)
from ..kvm.kvm_landing import Landing, land, upload_disks
from ..kvm.libvirt_import import preflight
from ..kvm.targets import Target, check_format, find_target, preflight_target, volume_name
from ..plan_definition import parse_network_map, parse_output_dir
from ..staging import Staging
from .convert_job import convert_staged, land_image
from .hyper2kvm import QUEUE_DIR, UnitState, follow, unit_name, unit_state
from .manifest import (boot_sorted, build_manifest, disk_ids, manifest_name, per_disk,
                       write_manifest)
from .overlap import StreamConversions

if TYPE_CHECKING:
    from ..config import Config
    from ..disks.convert import ConvertedImage
    from ..job_kinds import JobContext
    from ..model import ExportedDisk, VMInfo

FIELD = "hyper2kvm_integration"
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
FORMATS = ("qcow2", "raw")
DEFAULT_MEMORY_MB = 1024
_IMAGE_FORMATS = {".qcow2": "qcow2", ".vdi": "vdi"}  # the daemon's images; others are raw
_BOOL_FIELDS = ("enabled", "auto_convert", "daemon_mode", "import_to_kvm", "autostart",
                "start", "compression", "guest_conversion")
_STR_FIELDS = ("instance", "network", "format")


def _defaults(config: "Config") -> dict:
    return {
        "enabled": False,
        "auto_convert": False,
        "daemon_mode": False,
        "instance": "default",
        "import_to_kvm": False,
        "network": config.libvirt.network,
        "autostart": False,
        "start": False,
        "format": config.hyper2kvm.default_format,
        "compression": config.hyper2kvm.compression,
        "guest_conversion": False,
        "verify_boot": None,
        "network_map": {},
        "output_dir": "",
        "target": None,
    }


def validate_integration(block: Any, config: "Config") -> dict:
    """Check the job's `hyper2kvm_integration` object; return it with defaults filled.

    Fields: enabled, auto_convert, daemon_mode, instance (the `%i` of
    `hyper2kvm@.service`), import_to_kvm, network, autostart, start (boot the
    domain once defined), format (qcow2 | raw), compression, guest_conversion
    (virt-v2v-in-place before the define; in daemon mode hyper2kvm's fix stage),
    verify_boot (true or {timeout, expect}:
    start and wait for the guest to boot), network_map ({source network: {"network":
    name} or {"bridge": name}}: where each NIC goes; unmapped NICs go to `network`),
    output_dir (a directory under paths.outputs that receives `<vm>/` instead of
    hyper2kvm.output_dir), target (one of the config's targets: the converted disks are
    uploaded into its pool, in its format, and with import_to_kvm the domain is defined
    there). Unknown fields are refused so a typo never silently turns a conversion off.
    """
    defaults = _defaults(config)
    if block is None:
        return defaults
    fields = JsonObject(block, sorted(defaults), f"{FIELD}.")
    result = {key: fields.flag(key, defaults[key]) for key in _BOOL_FIELDS}
    result.update({key: fields.text(key, defaults[key], non_empty=True) for key in _STR_FIELDS})
    result["verify_boot"] = parse_verify_boot(block.get("verify_boot"), f"{FIELD}.verify_boot")
    result["network_map"] = parse_network_map(block.get("network_map"), f"{FIELD}.network_map")
    result["output_dir"] = (parse_output_dir(block["output_dir"], f"{FIELD}.output_dir", config)
                            if block.get("output_dir") else "")  # "": the default, as stored
    if result["output_dir"] and (result["daemon_mode"] or not result["enabled"]):
        raise InvalidArgument(f"{FIELD}.output_dir", "only for the Direct Pipeline "
                              "(enabled and auto_convert without daemon_mode)")
    target = find_target(config, block.get("target"), f"{FIELD}.target")
    if target is not None:
        result["target"] = target.name
        result["format"] = check_format(target, block.get("format", ""), f"{FIELD}.format")
        if result["output_dir"]:
            raise InvalidArgument(f"{FIELD}.output_dir", "not with a target (the disks go "
                                  "into the target's pool)")
        if result["daemon_mode"]:
            raise InvalidArgument(f"{FIELD}.target", "needs the built-in converter "
                                  "(daemon_mode: false)")
    if not INSTANCE_RE.match(result["instance"]):
        raise InvalidArgument(f"{FIELD}.instance", "letters, digits, '_', '.' and '-' only")
    if result["format"] not in FORMATS:
        raise InvalidArgument(f"{FIELD}.format", "one of " + ", ".join(FORMATS))
    if result["format"] == "raw" and block.get("compression"):
        raise InvalidArgument(f"{FIELD}.compression", "only qcow2 output can be compressed")
    if result["enabled"] and not (result["daemon_mode"] or result["auto_convert"]):
        raise InvalidArgument(FIELD, "enabled needs daemon_mode or auto_convert set to true")
    if result["import_to_kvm"] and not result["enabled"]:
        raise InvalidArgument(f"{FIELD}.import_to_kvm", "needs enabled: true")
    if (result["autostart"] or result["start"]) and not result["import_to_kvm"]:
        raise InvalidArgument(f"{FIELD}.autostart", "autostart and start need import_to_kvm: true")
    if result["verify_boot"] and not result["import_to_kvm"]:
        raise InvalidArgument(f"{FIELD}.verify_boot", "needs import_to_kvm: true")
    if result["guest_conversion"] and not (result["import_to_kvm"] or result["daemon_mode"]):
        raise InvalidArgument(f"{FIELD}.guest_conversion",
                              "needs import_to_kvm: true or daemon_mode: true")
    return result


async def enable_streaming(ctx: "JobContext", vm: "VMInfo", integration: dict,
                           streaming: StreamConversions) -> None:
    """When the Direct Pipeline will convert, let `streaming` start while the disks download."""
    if integration["enabled"] and not integration["daemon_mode"]:
        streaming.enable(await _output_staging(ctx, vm), integration["format"],
                         _compress(integration))


async def preflight_import(config: "Config", vm: "VMInfo", integration: dict) -> None:
    """With import_to_kvm, ask libvirt now whether the VM's name, UUID and network are
    usable, so neither a download nor an hour of conversion is spent on a VM that cannot
    be imported (the export job asks before the download, run_integration again before
    converting: the name may have been taken meanwhile)."""
    target = find_target(config, integration.get("target"), f"{FIELD}.target")
    if integration["import_to_kvm"]:
        nics = [nic_target(integration, nic.network) for nic in vm.nics]
        await preflight(target.uri if target else config.libvirt.uri, vm.name, _kept_uuid(vm),
                        [nic.network for nic in nics if nic.kind == "network"])
    if target is not None:
        await preflight_target(target, [volume_name(vm.name, f"disk{index}", target.format)
                                        for index in range(len(vm.disks))])


async def run_integration(ctx: "JobContext", vm: "VMInfo", disks: "list[ExportedDisk]",
                          export_dir: Path, integration: dict,
                          streamed: StreamConversions | None = None,
                          landed: "list[ExportedDisk] | None" = None) -> dict:
    """Run the hand-off chosen by `integration` (from validate_integration).

    Returns the job result's section: `mode` (export-only, daemon, handed-off, builtin,
    builtin-fallback), the manifests, the converted disks and the domain.
    `disks` are the exported disks where the job reads them (its staging directory),
    `landed` the same disks where the export put them for others (the daemon;
    default: `disks`).
    `streamed` holds the conversions that ran during the export (builtin mode).
    With import_to_kvm, libvirt is asked first (preflight_import).

    In daemon mode, when hyper2kvm@<instance> is not active (or the config says
    `hyper2kvm.daemon_enabled: false`): with `auto_convert: true` the job log says so
    and the built-in converter converts instead (waiting for a dead daemon would only
    wait out `job_timeout`); without it the manifests are left for the daemon and the
    job ends "handed off" without converting anything: it was not asked to.
    """
    if not integration["enabled"]:
        return {"mode": "export-only"}
    await preflight_import(ctx.config, vm, integration)
    if integration["daemon_mode"]:
        state = await _daemon_state(ctx.config, integration["instance"])
        if state.active or not integration["auto_convert"]:
            result = await _hand_off(ctx, vm, landed or disks, integration, state)
        else:
            ctx.log(f"{state.describe()}: converting with the built-in converter instead "
                    "(auto_convert: true)", "warning")
            result = {**await _convert_builtin(ctx, vm, disks, integration),
                      "mode": "builtin-fallback", "fallback_reason": state.describe()}
    else:
        result = await _convert_builtin(ctx, vm, disks, integration, streamed)
    return {**result, "export_dir": str(export_dir)}


async def _daemon_state(config: "Config", instance: str) -> UnitState:
    """The unit's state, unless the config says no hyper2kvm daemon is deployed here."""
    if not config.hyper2kvm.daemon_enabled:
        return UnitState(unit_name(instance), "disabled in the config",
                         "hyper2kvm.daemon_enabled: false")
    return await unit_state(instance)


def _kept_uuid(vm: "VMInfo") -> str:
    """The source UUID when it is one (libvirt keeps it), else "" (libvirt picks one)."""
    return vm.uuid if is_uuid(vm.uuid) else ""


async def _output_staging(ctx: "JobContext", vm: "VMInfo",
                          streamed: StreamConversions | None = None) -> Staging:
    """The job's staging in output_dir/<vm>/ (created, and removed again if the job fails,
    unless it exists): the one the stream conversions use, when they run."""
    if streamed is not None and streamed.staging is not None:
        return streamed.staging
    if integration_dir := ctx.definition.get(FIELD, {}).get("output_dir"):
        root, relative = split_under(integration_dir, ctx.config.paths.outputs,
                                     f"{FIELD}.output_dir", "paths.outputs")
        dest = await asyncio.to_thread(open_dir, root, f"{relative}/{safe_name(vm.name)}",
                                       f"{FIELD}.output_dir", create=True)
    else:
        dest = await asyncio.to_thread(open_dir, Path(ctx.config.hyper2kvm.output_dir),
                                       safe_name(vm.name), "hyper2kvm.output_dir", create=True)
    return ctx.staging(dest)


async def _hand_off(ctx: "JobContext", vm: "VMInfo", disks: "list[ExportedDisk]",
                    integration: dict, state: UnitState) -> dict:
    """Land one manifest per disk where hyper2kvm@<instance> takes them; follow the
    daemon when its unit is active, else leave them for it."""
    settings = ctx.config.hyper2kvm
    manifest = build_manifest(vm, disks, job_id=ctx.job_id, output_format=integration["format"],
                              compress=_compress(integration),
                              guest_fix=integration["guest_conversion"],
                              export_method=str(ctx.definition.get("export_method", "")),
                              hypersdk_version=__version__)
    singles = per_disk(manifest)
    ctx.set_stage("handoff")
    base = Path(settings.watch_dir) / integration["instance"]
    queue = await asyncio.to_thread(open_dir, Path(settings.watch_dir),
                                    f"{integration['instance']}/{QUEUE_DIR}",
                                    "hyper2kvm.watch_dir", create=True)
    # A job that fails or is cancelled withdraws the manifests the daemon has not taken
    # yet (they landed through the job's staging), so it does not convert for nothing.
    staging = ctx.staging(queue)
    paths = [await asyncio.to_thread(write_manifest, single, staging,
                                     manifest_name(vm.name, ctx.job_id, disk_id))
             for disk_id, single in singles]
    ctx.log(f"handed off to {state.unit.removesuffix('.service')}: "
            + ", ".join(str(p) for p in paths))
    result = {"mode": "daemon", "unit": state.unit, "daemon_dir": str(base),
              "manifests": [str(p) for p in paths]}
    if not state.active:
        ctx.log(f"{state.describe()}: the manifests wait in {queue.shown} for it; nothing is "
                "converted here (auto_convert: false)", "warning")
        if integration["import_to_kvm"]:
            ctx.log("import_to_kvm: nothing to import until the daemon has converted the "
                    "disks", "warning")
        return {**result, "mode": "handed-off", "daemon": state.describe()}
    images = await _follow(ctx, base, paths, [d.capacity_bytes for d in boot_sorted(disks)])
    converted = [(image, _IMAGE_FORMATS.get(image.suffix, "raw")) for image in images]
    result["disks"] = [{"path": str(p), "format": f, "manifest": str(m)}
                       for (p, f), m in zip(converted, paths)]
    if integration["import_to_kvm"]:
        # hyper2kvm 0.2.1's daemon runs its guest fix stage on every disk it converts.
        result["import"] = await _import(ctx, vm, converted,
                                         {**integration, "guest_conversion": False})
    return result


async def _follow(ctx: "JobContext", base: Path, paths: list[Path], sizes: list[int]) -> list[Path]:
    """Wait for the daemon to convert every manifest; progress advances by each
    disk's capacity as the daemon finishes it (it says nothing in between)."""
    settings = ctx.config.hyper2kvm
    ctx.set_stage("waiting for hyper2kvm")
    ctx.add_total(sum(sizes))
    size_of = {path.name: size for path, size in zip(paths, sizes)}

    def done(name: str, image: Path) -> None:
        ctx.advance(size_of[name])
        ctx.log(f"hyper2kvm converted {name}: {image}")

    images = await follow(base, Path(settings.output_dir), [p.name for p in paths],
                          poll_interval=settings.poll_interval, timeout=settings.job_timeout,
                          log=ctx.log, on_done=done)
    return [images[path.name] for path in paths]


async def _convert_builtin(ctx: "JobContext", vm: "VMInfo", disks: "list[ExportedDisk]",
                           integration: dict,
                           streamed: StreamConversions | None = None) -> dict:
    """The Direct Pipeline: convert every disk into output_dir/<vm>/, then maybe import.
    Disks `streamed` converted during the export are only moved to their names. With a
    target, the disks are uploaded into its pool from the staging directory instead."""
    staging = await _output_staging(ctx, vm, streamed)
    out_dir = staging.dest.shown
    target = find_target(ctx.config, integration.get("target"), f"{FIELD}.target")
    fmt = integration["format"]
    ordered = boot_sorted(disks)
    finals = [f"{disk_id}.{fmt}" for disk_id in disk_ids(ordered)]
    for final in finals:
        if target is None and staging.dest.holds(final):
            raise AlreadyExists(f"{out_dir / final} already exists (an earlier conversion of "
                                "this VM?); it is left untouched: move it away or rename the VM")
    ctx.set_stage("convert")
    done = await streamed.results() if streamed is not None else {}
    counted = streamed.counted if streamed is not None else set()
    ctx.add_total(sum(disk.capacity_bytes for disk in ordered if disk.key not in counted))
    converted = [done[disk.key] if disk.key in done
                 else await convert_staged(ctx, staging, disk.path, final, fmt=fmt,
                                           compress=_compress(integration),
                                           planned=disk.capacity_bytes, shown=disk.path.name)
                 for disk, final in zip(ordered, finals)]
    if target is not None:
        return await _to_target(ctx, vm, converted, integration, target)
    converted = [await land_image(staging, image, final)
                 for image, final in zip(converted, finals)]
    ctx.log(f"converted {len(converted)} disk(s) into {out_dir}")
    result = {"mode": "builtin", "output_dir": str(out_dir),
              "disks": [image.to_dict() for image in converted]}
    if integration["import_to_kvm"]:
        result["import"] = await _import(ctx, vm, [(i.path, i.format) for i in converted],
                                         integration)
    return result


def nic_target(integration: dict, source_network: str) -> DomainNic:
    """Where a NIC on `source_network` goes: its network_map entry, else `network`."""
    kind, name = next(iter(integration["network_map"].get(
        source_network, {"network": integration["network"]}).items()))
    return DomainNic(name, kind=kind)


async def _to_target(ctx: "JobContext", vm: "VMInfo", converted: "list[ConvertedImage]",
                     integration: dict, target: Target) -> dict:
    """The converted disks (in the staging directory) uploaded to `target`: with
    import_to_kvm by the landing, with the domain defined there; else only uploaded."""
    result = {"mode": "builtin", "target": target.name}
    images = [(image.path, image.format) for image in converted]
    if integration["import_to_kvm"]:
        result["import"] = await _import(ctx, vm, images, integration, target)
        result["volumes"] = result["import"]["volumes"]
    else:
        volumes = await upload_disks(ctx, target, vm.name,
                                     [DomainDisk(path, fmt) for path, fmt in images])
        result["volumes"] = [volume.to_dict() for volume in volumes]
    return result


def _compress(integration: dict) -> bool:
    return integration["compression"] and integration["format"] == "qcow2"


async def _import(ctx: "JobContext", vm: "VMInfo", images: list[tuple[Path, str]],
                  integration: dict, target: Target | None = None) -> dict:
    ctx.set_stage("import")
    uuid = _kept_uuid(vm)
    if vm.uuid and not uuid:
        ctx.log(f"the source id {vm.uuid!r} is not a UUID; libvirt assigns a new one", "warning")
    spec = DomainSpec(
        name=vm.name, uuid=uuid, memory_mb=vm.memory_mb or DEFAULT_MEMORY_MB,
        vcpus=max(1, vm.cpus), disks=[DomainDisk(Path(p), f) for p, f in images],
        nics=[replace(nic_target(integration, nic.network), mac=nic.mac) for nic in vm.nics],
        firmware=vm.firmware if vm.firmware in ("bios", "uefi") else "bios",
        secure_boot=vm.secure_boot and vm.firmware == "uefi",
        os_family=guest_family(vm.guest_os),
        serial_log=serial_log_beside(Path(images[0][0]), vm.name))
    if not vm.memory_mb:
        ctx.log(f"the VM reports no memory size; giving it {DEFAULT_MEMORY_MB} MiB", "warning")
    return await land(ctx, spec, Landing(integration["autostart"], integration["start"],
                                         integration["guest_conversion"],
                                         integration["verify_boot"]), target)
