"""The "convert" job: a disk image, an OVF or an OVA in, qcow2/raw disks out.

Definition (the spec's `/convert` body):
    {"source_path": "/abs/vm.ovf" | "/abs/vm.ova" | "/abs/disk.vmdk",
     "output_path": "/abs/dir",
     "conversion_options": {"format": "qcow2" | "raw", "compression": bool,
                            "source_format": "raw" | "vmdk" | ...}}
source_path must lie inside `paths.sources`, output_path inside `paths.outputs`
(service/confine.py). The kind of source is read from its content, not its name, and
must agree with its name; a source that is only raw data is converted only when the
caller says `source_format: "raw"` (service/disks/disk_format.py). Every disk an
OVF/OVA references is converted into output_path through the job's staging
directory; progress adds up over all of them in bytes of virtual size. If any disk
fails, the disks that had landed are removed again.

A disk lands as `<its file's stem>.<format>`, except the one disk of a one-disk OVF or
OVA: that is `disk.<format>`, the name the spec's `/import-to-kvm` example (4.3) imports
from what its `/convert` example (4.2) wrote. The result lists every disk it produced
(`disks[].path`, boot order as in the OVF).

With `target` (one of the config's targets, kvm/targets.py) the disks are converted to
the target's format in output_path's staging directory and uploaded into its pool as
volumes of those names (`disk.<format>` as `<source's stem>.<format>`, so that two
VMs' only disks do not meet in one pool) instead of landing in output_path;
`disks[].volume` says where each went.
"""
from __future__ import annotations

import asyncio
import dataclasses
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

from ..confine import OpenFile, check_source, open_output_dir, open_source, split_under
from ..definitions import JsonObject
from ..errors import InvalidArgument
from ..job_kinds import JobContext, JobKind, SubmitContext, register
from ..kvm.targets import check_format, find_target, preflight_target, upload_volume
from ..staging import Staging
from ..disks.convert import OUTPUT_FORMATS, ConvertedImage, convert_image, inspect_source
from ..disks.disk_format import SOURCE_FORMATS, check_claimed_format
from ..disks.ova_extract import extract_ova, verify_manifest
from ..disks.ovf import OvfInfo, parse_ovf
from ..disks.threads import from_any_thread, run_stoppable
from ..disks.vmdk import external_files
from .overlap import JobProgress

FIELDS = ("source_path", "output_path", "conversion_options", "target")
OPTION_FIELDS = ("format", "compression", "source_format")


def sniff_source(path: Path) -> str:
    """"ova" (tar), "ovf" (XML) or "image", from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[257:262] == b"ustar":
        return "ova"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return "ovf"
    return "image"


def _disk_names(ovf_name: str, info: OvfInfo) -> list[str]:
    """The file names of an OVF's disks: plain names next to the descriptor, each a disk
    the OVF's References list (a Disk without a file is a blank disk: refused, since
    there is nothing to convert and the VM would lose it silently)."""
    names = []
    for disk in info.disks:
        if not disk.file_href:
            raise InvalidArgument("source_path", f"{ovf_name}: disk {disk.disk_id} has no file "
                                  "(a blank disk); hypervisord converts only disks with data")
        rel = PurePosixPath(disk.file_href)
        if len(rel.parts) != 1 or "://" in disk.file_href or rel.name in (".", ".."):
            raise InvalidArgument("source_path", f"{ovf_name}: disk file {disk.file_href!r} "
                                                 "must be a plain name next to the OVF")
        names.append(rel.name)
    if not names:
        raise InvalidArgument("source_path", f"{ovf_name}: the OVF describes no disks")
    return names


def stable_source(source: OpenFile, staging: Staging, field_name: str) -> Path:
    """A race-free path to read `source` (and the extents a VMDK descriptor names) by,
    valid while `source` stays open."""
    path = staging.link_source(source, field_name)
    for name in external_files(path):
        with source.sibling(name, field_name) as extent:
            staging.link_source(extent, field_name)
    return path


class ConvertKind(JobKind):
    name = "convert"
    operation = "convert"
    polkit_action = "org.hypersdk.HyperSDK1.convert"

    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        fields = JsonObject(definition, FIELDS)
        paths = submit.config.paths
        source = check_source(definition.get("source_path"), paths.sources, "source_path")
        root, relative = split_under(definition.get("output_path"), paths.outputs,
                                     "output_path", "output")
        output = root / relative
        options = fields.section("conversion_options", OPTION_FIELDS)
        target = find_target(submit.config, definition.get("target"), "target")
        fmt = options.text("format", "" if target else submit.config.hyper2kvm.default_format,
                           choices=("", *OUTPUT_FORMATS) if target else OUTPUT_FORMATS)
        if target is not None:
            fmt = check_format(target, fmt, "conversion_options.format")
        compression = options.flag("compression", submit.config.hyper2kvm.compression)
        if compression and fmt != "qcow2":
            raise InvalidArgument("conversion_options.compression", "only qcow2 can be compressed")
        source_format = options.text("source_format", "", choices=("", *SOURCE_FORMATS))
        result = {"format": fmt, "compression": compression}
        if source_format:
            result["source_format"] = source_format
        return {"source_path": source, "output_path": str(output),
                "conversion_options": result, **({"target": target.name} if target else {})}

    def describe(self, definition: dict) -> dict:
        return {"vm": Path(definition.get("source_path", "")).stem, "provider": ""}

    async def run(self, ctx: JobContext) -> dict:
        definition = ctx.definition
        paths = ctx.config.paths
        with ExitStack() as files:  # what the job opened, closed when it ends
            source = files.enter_context(await asyncio.to_thread(
                open_source, definition["source_path"], paths.sources, "source_path"))
            dest = await asyncio.to_thread(open_output_dir, definition["output_path"],
                                           paths.outputs, "output_path")
            return await self._run(ctx, source, ctx.staging(dest), files)

    async def _run(self, ctx: JobContext, source: OpenFile, staging: Staging,
                   files: ExitStack) -> dict:
        options = ctx.definition["conversion_options"]
        readable = await asyncio.to_thread(stable_source, source, staging, "source_path")
        kind = await asyncio.to_thread(sniff_source, readable)
        info: OvfInfo | None = None
        extracted = 0
        if kind == "ova":
            ovf_path, extracted = await self._extract(ctx, readable, source.size,
                                                      staging.path / "ova")
            info = await asyncio.to_thread(parse_ovf, ovf_path)
            disks = [ovf_path.parent / name for name in _disk_names(source.name, info)]
        elif kind == "ovf":
            info = await asyncio.to_thread(parse_ovf, readable)
            disks = [await asyncio.to_thread(
                stable_source, files.enter_context(source.sibling(name, "source_path")),
                staging, "source_path") for name in _disk_names(source.name, info)]
            checked = await asyncio.to_thread(verify_manifest, source, staging)
            ctx.log(f"manifest: {len(checked)} files checked" if checked
                    else "no .mf manifest next to the OVF; digests not checked")
        else:
            disks = [readable]
        converted = await self._convert_all(ctx, disks, staging, options, extracted,
                                            claimed=options.get("source_format", ""),
                                            names=[source.name] if kind == "image" else None,
                                            one_vm_disk=kind != "image" and len(disks) == 1)
        return {"disks": converted, "ovf": info.to_dict() if info else None,
                "output_path": str(staging.dest.shown)}

    async def _extract(self, ctx: JobContext, source: Path, size: int,
                       scratch: Path) -> tuple[Path, int]:
        """Extract the OVA into scratch, progress in bytes of the OVA: (.ovf path, OVA size)."""
        ctx.set_stage("extract")
        ctx.set_total(size)
        ctx.log(f"extracting {Path(ctx.definition['source_path']).name} (checking its manifest)")
        log, on_bytes = from_any_thread(ctx.log), from_any_thread(ctx.advance)
        ovf_path = await run_stoppable(lambda stop: extract_ova(
            source, scratch, log=log, stop=stop, on_bytes=on_bytes))
        ctx.set_done(size)
        return ovf_path, size

    async def _convert_all(self, ctx: JobContext, disks: list[Path], staging: Staging,
                           options: dict, done_before: int, claimed: str,
                           names: list[str] | None, one_vm_disk: bool) -> list[dict]:
        """Convert every disk into staging, then land each under its final name.

        `names`: the names users know the disks by (the file names they gave), when
        `disks` are paths through a staging link or an fd. `one_vm_disk`: the disk is
        a VM's only one, landed as disk.<format> (module docstring)."""
        fmt = options["format"]
        shown = names or [disk.name for disk in disks]
        finals = ([f"disk.{fmt}"] if one_vm_disk
                  else [f"{PurePosixPath(name).stem}.{fmt}" for name in shown])
        if len(set(finals)) != len(finals):
            raise InvalidArgument("source_path", "two disks would convert to the same file name")
        # Check every disk before converting any, so a bad one fails the job early.
        sizes = []
        for disk, name in zip(disks, shown):
            info = await asyncio.to_thread(inspect_source, disk)
            check_claimed_format(info["format"], int(info["virtual-size"]), name, claimed,
                                 "source_path", "conversion_options.source_format")
            sizes.append(int(info["virtual-size"]))
        target = find_target(ctx.config, ctx.definition.get("target"), "target")
        if target is not None:
            stem = PurePosixPath(shown[0]).stem
            finals = [f"{stem}.{fmt}" if one_vm_disk else final for final in finals]
            await preflight_target(target, finals)
        ctx.set_total(done_before + sum(sizes))
        converted: list[dict] = []
        for disk, name, final, size in zip(disks, shown, finals, sizes):
            if not converted or target is not None:  # back from the last disk's upload
                ctx.set_stage("convert")
            image = await convert_staged(ctx, staging, disk, final, fmt=fmt,
                                         compress=options["compression"], planned=size,
                                         shown=name)
            if target is None:
                converted.append((await land_image(staging, image, final)).to_dict())
            else:
                volume = await upload_volume(ctx, target, image.path, final, image.virtual_size)
                converted.append({**image.to_dict(), "path": volume.path,
                                  "volume": volume.to_dict()})
        return converted


async def convert_staged(ctx: JobContext, staging: Staging, source: Path, final: str, *,
                         fmt: str, compress: bool, planned: int, shown: str) -> ConvertedImage:
    """Convert one disk into `staging` as `final`; the job advances by up to `planned`
    bytes. The convert job and the export's Direct Pipeline both use it."""
    ctx.log(f"converting {shown} -> {final}")
    return await convert_image(source, staging.path / final, out_format=fmt, compress=compress,
                               on_progress=JobProgress(ctx, planned), log=ctx.log)


async def land_image(staging: Staging, image: ConvertedImage, final: str) -> ConvertedImage:
    """`image` (a file in `staging`) landed as `final`: the same image at its landed path."""
    landed = await asyncio.to_thread(staging.land, image.path.name, final)
    return dataclasses.replace(image, path=landed)


register(ConvertKind())
