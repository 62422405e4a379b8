"""The "convert" job: a disk image, an OVF or an OVA in, qcow2/raw disks out.

Definition (the spec's `/convert` body):
    {"source_path": "/abs/vm.ovf" | "/abs/vm.ova" | "/abs/disk.vmdk",
     "output_path": "/abs/dir",
     "conversion_options": {"format": "qcow2" | "raw", "compression": bool}}
The kind of source is read from its content, not its name. Every disk an OVF/OVA
references is converted into output_path; progress adds up over all of them in
bytes of virtual size. Each finished disk is removed again if a later one fails.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from ..definitions import check_fields
from ..errors import AlreadyExists, InvalidArgument
from ..job_kinds import JobContext, JobKind, SubmitContext, register
from .convert import OUTPUT_FORMATS, convert_image, inspect_source
from .ova import extract_ova, verify_manifest
from .ovf import OvfInfo, parse_ovf
from .threads import run_stoppable

FIELDS = ("source_path", "output_path", "conversion_options")
OPTION_FIELDS = ("format", "compression")


def _absolute_path(definition: dict, field: str) -> Path:
    value = definition.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(field, "required, a path string")
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise InvalidArgument(field, "must be an absolute path")
    if ".." in path.parts:
        raise InvalidArgument(field, "must not contain '..' components")
    return Path(value)


def sniff_source(path: Path) -> str:
    """"ova" (tar), "ovf" (XML) or "image", from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[257:262] == b"ustar":
        return "ova"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return "ovf"
    return "image"


def _disk_paths(ovf_path: Path, info: OvfInfo) -> list[Path]:
    paths = []
    for disk in info.disks:
        if not disk.file_href:
            continue
        rel = PurePosixPath(disk.file_href)
        if rel.is_absolute() or ".." in rel.parts or "://" in disk.file_href:
            raise InvalidArgument(str(ovf_path), f"disk file {disk.file_href!r} must be a "
                                                 f"relative name next to the OVF")
        paths.append(ovf_path.parent / rel)
    return paths


class ConvertKind(JobKind):
    name = "convert"
    operation = "convert"
    polkit_action = "org.hypersdk.HyperSDK1.convert"

    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        check_fields(definition, FIELDS)
        source = _absolute_path(definition, "source_path")
        output = _absolute_path(definition, "output_path")
        if not source.is_file():
            raise InvalidArgument("source_path", "no such file")
        if output.exists() and not output.is_dir():
            raise InvalidArgument("output_path", "exists and is not a directory")
        options = check_fields(definition.get("conversion_options", {}), OPTION_FIELDS,
                               prefix="conversion_options.")
        fmt = options.get("format", submit.config.hyper2kvm.default_format)
        if fmt not in OUTPUT_FORMATS:
            raise InvalidArgument("conversion_options.format",
                                  f"must be one of {', '.join(OUTPUT_FORMATS)}")
        compression = options.get("compression", submit.config.hyper2kvm.compression)
        if not isinstance(compression, bool):
            raise InvalidArgument("conversion_options.compression", "must be true or false")
        if compression and fmt != "qcow2":
            raise InvalidArgument("conversion_options.compression", "only qcow2 can be compressed")
        return {"source_path": str(source), "output_path": str(output),
                "conversion_options": {"format": fmt, "compression": compression}}

    def describe(self, definition: dict) -> dict:
        return {"vm": Path(definition.get("source_path", "")).stem, "provider": ""}

    async def run(self, ctx: JobContext) -> dict:
        definition = ctx.definition
        source = Path(definition["source_path"])
        output = Path(definition["output_path"])
        options = definition["conversion_options"]
        if not output.exists():
            output.mkdir(parents=True, mode=0o755)
            ctx.add_cleanup(output)
        kind = await asyncio.to_thread(sniff_source, source)
        info: OvfInfo | None = None
        scratch: Path | None = None
        extracted = 0
        try:
            if kind == "ova":
                scratch = output / f".{source.stem}.ova-extract"
                ctx.add_cleanup(scratch)
                ovf_path, extracted = await self._extract(ctx, source, scratch)
            elif kind == "ovf":
                ovf_path = source
                checked = await asyncio.to_thread(verify_manifest, source.parent)
                ctx.log(f"manifest: {len(checked)} files checked" if checked
                        else "no .mf manifest next to the OVF; digests not checked")
            if kind in ("ova", "ovf"):
                info = await asyncio.to_thread(parse_ovf, ovf_path)
                disks = _disk_paths(ovf_path, info)
            else:
                disks = [source]
            converted = await self._convert_all(ctx, disks, output, options, extracted)
        finally:
            if scratch is not None:
                await asyncio.to_thread(shutil.rmtree, scratch, True)
        ctx.keep(output)
        return {"disks": converted, "ovf": info.to_dict() if info else None,
                "output_path": str(output)}

    async def _extract(self, ctx: JobContext, source: Path, scratch: Path) -> tuple[Path, int]:
        """Extract the OVA into scratch, progress in bytes of the OVA: (.ovf path, OVA size)."""
        loop = asyncio.get_running_loop()
        size = source.stat().st_size
        ctx.set_stage("extract")
        ctx.set_total(size)
        ctx.log(f"extracting {source.name} (checking its manifest)")

        def log(message: str) -> None:
            loop.call_soon_threadsafe(ctx.log, message)

        def on_bytes(nbytes: int) -> None:
            loop.call_soon_threadsafe(ctx.advance, nbytes)

        ovf_path = await run_stoppable(lambda stop: extract_ova(
            source, scratch, log=log, stop=stop, on_bytes=on_bytes))
        ctx.set_done(size)
        return ovf_path, size

    async def _convert_all(self, ctx: JobContext, disks: list[Path], output: Path,
                           options: dict, done_before: int) -> list[dict]:
        fmt = options["format"]
        targets = [output / f"{disk.stem}.{fmt}" for disk in disks]
        for target in targets:
            if target.exists():
                raise AlreadyExists(f"{target}: already exists; not overwritten")
        if len(set(targets)) != len(targets):
            raise InvalidArgument("source_path", "two disks would convert to the same file name")
        # Check every disk before converting any, so a bad one fails the job early.
        sizes = [int((await asyncio.to_thread(inspect_source, disk))["virtual-size"])
                 for disk in disks]
        ctx.set_total(done_before + sum(sizes))
        ctx.set_stage("convert")
        results, base = [], done_before
        for disk, target, size in zip(disks, targets, sizes):
            ctx.log(f"converting {disk.name} -> {target.name}")
            image = await convert_image(
                disk, target, out_format=fmt, compress=options["compression"],
                on_progress=lambda done, _total, b=base: ctx.set_done(b + done), log=ctx.log)
            ctx.add_cleanup(target)
            results.append(image.to_dict())
            base += size
        for target in targets:
            ctx.keep(target)
        return results


register(ConvertKind())
