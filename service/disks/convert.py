"""Convert one disk image to qcow2 or raw with qemu-img, safely and with progress.

The input format is detected with `qemu-img info` (never from the extension) and
passed explicitly, images with backing files are refused (a hostile qcow2 could
point at any file on the host), and the output is written to a hidden temporary
name in the target directory and renamed into place only when complete. On
failure or cancellation qemu-img's process group is killed and the temporary
file removed. streamOptimized VMDKs go through our parallel decoder
(`streamopt.py`), which is faster than qemu-img's single-threaded inflate, writes
qcow2 directly and can start while the VMDK is still downloading (`growing`).

Uncompressed qcow2 and raw output is written by qemu-img with `-t none` (O_DIRECT)
where the filesystem allows it: measured on the 2-core test machine, a 2 GiB VHDX to
qcow2 took 1.4 s instead of 4.2 s with writeback caching (which spends ~1.5 CPU-s per
GiB in the kernel filling the page cache), and the data is on disk when qemu-img
exits, so the fsync before the rename is short. `-W` lets qemu-img keep several of
those writes in flight instead of waiting for each (2 GiB VHDX: 1.3 s instead of
1.5-1.7 s, as fast as plain qemu-img, which only fills the page cache). The price:
qcow2 clusters land in the file in the order the writes finish (runs of about 1 MiB,
not in guest order), which costs nothing on SSDs and network storage; on rotating
disks a later `qemu-img convert` without `-W` restores the order. Compressed output
stays buffered: it is CPU-bound and small, and O_DIRECT made it slower. There `-W`
lets qemu-img compress clusters on more than one thread at a time: 2 GiB of raw to
compressed qcow2 took 21.6 s instead of 40.9 s. The input is read through
the page cache (`-T none` halved qemu-img's read speed).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import AlreadyExists, Failed, InvalidArgument
from ..direct_io import supports_direct_io
from ..files import fds_in, fsync_file
from . import streamopt
from .vmdk import parse_vmdk
from .threads import from_any_thread, run_stoppable

OUTPUT_FORMATS = ("qcow2", "raw")
INPUT_FORMATS = ("vmdk", "vpc", "vhdx", "raw", "qcow2")
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
# Share of a streamOptimized -> compressed qcow2 conversion spent decoding (the rest
# is qemu-img compressing the raw result); only shapes the progress curve.
_DECODE_SHARE = 0.7

ProgressFn = Callable[[int, int], None]
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class ConvertedImage:
    path: Path
    format: str
    virtual_size: int
    actual_size: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

VHD_FOOTER_BYTES = 512
VHD_COOKIE = b"conectix"


def image_info(path: Path) -> dict:
    """`qemu-img info --output=json` of an image (blocking).

    A fixed VHD (what Azure and Hyper-V hand out) has its only marker in the footer,
    which qemu-img's probe does not read: it would call the disk "raw" and convert the
    512-byte footer as data. A raw probe whose last sector is a VHD footer is read as vpc.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(str(path), "no such file")
    info = _qemu_img_info(path)
    if info["format"] == "raw" and _ends_with_vhd_footer(path):
        info = _qemu_img_info(path, "vpc")
    return info


def _qemu_img_info(path: Path, fmt: str | None = None) -> dict:
    forced = ["-f", fmt] if fmt else []
    args = ["qemu-img", "info", "--output=json", *forced, str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60,
                          pass_fds=fds_in(args))
    if proc.returncode != 0:
        raise Failed(f"{path}: qemu-img cannot read it: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout)


def _ends_with_vhd_footer(path: Path) -> bool:
    size = path.stat().st_size
    if size < VHD_FOOTER_BYTES:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - VHD_FOOTER_BYTES)
        return handle.read(len(VHD_COOKIE)) == VHD_COOKIE


def detect_format(path: Path) -> str:
    """The image format qemu-img sees in the file's content ("vmdk", "vpc", "raw", ...)."""
    return image_info(path)["format"]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def inspect_source(source: Path) -> dict:
    """qemu-img's info on an input image, after refusing what must not be converted.

    Blocking. Refuses unknown formats, backing files, VMDK delta disks and
    incomplete VMDKs (missing extents, truncated streams).
    """
    info = image_info(source)
    fmt = info["format"]
    if fmt not in INPUT_FORMATS:
        raise InvalidArgument(str(source),
                              f"format {fmt!r} is not one of {', '.join(INPUT_FORMATS)}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidArgument(str(source), "images with a backing file are refused; convert a "
                                           "flattened image")
    if fmt == "vmdk":
        vmdk = parse_vmdk(source)
        if vmdk["parent"]:
            raise InvalidArgument(str(source), "a VMDK delta disk (it has a parent) cannot be "
                                               "converted on its own")
        if not vmdk["complete"]:
            raise Failed(f"{source}: the VMDK is incomplete (missing or truncated extents)")
    return info


def _is_stream_optimized(info: dict) -> bool:
    data = info.get("format-specific", {}).get("data", {})
    return info["format"] == "vmdk" and data.get("create-type") == "streamOptimized"


async def convert_image(source: Path, target: Path, *, out_format: str, compress: bool = False,
                        on_progress: ProgressFn | None = None, log: LogFn | None = None,
                        growing: streamopt.GrowingFile | None = None) -> ConvertedImage:
    """Convert `source` into `target` (qcow2 or raw); progress in bytes of virtual size.

    `target` is a new name in the job's staging directory (service/staging.py), which
    nobody else can enter: it is written in place and is removed if the conversion
    fails; the caller lands it. With `growing`, `source` is a streamOptimized VMDK
    still being downloaded: the decoder starts on the first bytes and keeps pace
    with the download.
    """
    source, target = Path(source), Path(target)
    if out_format not in OUTPUT_FORMATS:
        raise InvalidArgument("format", f"must be one of {', '.join(OUTPUT_FORMATS)}")
    if compress and out_format != "qcow2":
        raise InvalidArgument("compression", "only qcow2 output can be compressed")
    if not target.parent.is_dir():
        raise InvalidArgument(str(target), "its directory does not exist")
    if growing is None:
        info = await asyncio.to_thread(inspect_source, source)
    else:
        info = await run_stoppable(lambda stop: _growing_stream_info(source, growing, stop))
    size = int(info["virtual-size"])
    report = on_progress or (lambda done, total: None)
    say = log or (lambda message: None)
    if target.exists():
        raise AlreadyExists(f"{target.name}: already converted in this job")
    try:
        if _is_stream_optimized(info):
            say(f"decoding streamOptimized {source.name} on {streamopt_workers()} threads")
            await _convert_stream_optimized(source, target, out_format, compress, size, report,
                                            growing)
        else:
            say(f"converting {source.name} ({info['format']}) to {out_format} with qemu-img")
            await run_qemu_img_convert(source, info["format"], target, out_format, compress,
                                       lambda frac: report(int(size * frac), size))
        await asyncio.to_thread(fsync_file, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    report(size, size)
    actual = target.stat().st_blocks * 512
    return ConvertedImage(target, out_format, size, actual)


def _growing_stream_info(source: Path, growing: streamopt.GrowingFile, stop) -> dict:
    """What inspect_source gives, for a streamOptimized VMDK whose download is under way."""
    with open(source, "rb") as fh:
        header = streamopt.read_header(source, fh, growing, stop)
    return {"format": "vmdk", "virtual-size": header.capacity_sectors * 512,
            "format-specific": {"data": {"create-type": "streamOptimized"}}}


def streamopt_workers() -> int:
    """Inflate threads: one per core plus two, at most 6. Each thread also writes its
    grains (O_DIRECT, so it waits for the disk); the two extra keep the cores busy
    meanwhile (bench/pipeline.py, 2 cores: 3.2 s with 4 threads, 3.8-4.5 s with 2).
    Beyond that the marker-parsing thread and the GIL are the limit."""
    return min(6, (os.cpu_count() or 2) + 2)


async def _convert_stream_optimized(source: Path, tmp: Path, out_format: str, compress: bool,
                                    size: int, report: ProgressFn,
                                    growing: streamopt.GrowingFile | None) -> None:
    """Decode straight into raw or qcow2; compressed qcow2 goes raw first, then qemu-img -c."""
    if not compress:
        await _decode_in_thread(source, tmp, out_format, growing,
                                lambda done, total: report(size * done // total, size))
        return
    raw = tmp.with_name(tmp.name + ".raw")
    try:
        await _decode_in_thread(source, raw, "raw", growing, lambda done, total: report(
            int(size * _DECODE_SHARE * done / total), size))
        await run_qemu_img_convert(
            raw, "raw", tmp, "qcow2", True,
            lambda frac: report(int(size * (_DECODE_SHARE + (1 - _DECODE_SHARE) * frac)), size))
    finally:
        raw.unlink(missing_ok=True)


async def _decode_in_thread(source: Path, target: Path, out_format: str,
                            growing: streamopt.GrowingFile | None, progress: ProgressFn) -> None:
    thread_safe_progress = from_any_thread(progress)
    await run_stoppable(lambda stop: streamopt.decode(
        source, target, out_format=out_format, workers=streamopt_workers(),
        on_progress=thread_safe_progress, stop=stop, growing=growing))


def qemu_img_convert_args(source: Path, in_format: str, target: Path, out_format: str, *,
                          compress: bool, direct: bool, out_options: str = "") -> list[str]:
    """The `qemu-img convert -p` command line for one conversion (see the module
    docstring for -W, -c and -t none; `direct`: the target's filesystem takes O_DIRECT)."""
    args = ["qemu-img", "convert", "-p", "-f", in_format, "-O", out_format]
    if out_format in OUTPUT_FORMATS:  # not a streamOptimized VMDK, which is written in order
        args.append("-W")
        if not compress and direct:
            args += ["-t", "none"]
    if compress:
        args.append("-c")
    if out_options:  # e.g. "subformat=streamOptimized"
        args += ["-o", out_options]
    return args + [str(source), str(target)]


async def run_qemu_img_convert(source: Path, in_format: str, target: Path, out_format: str,
                               compress: bool, on_fraction: Callable[[float], None],
                               out_options: str = "") -> None:
    """Run `qemu-img convert -p` in its own process group, parsing its percentage lines."""
    direct = await asyncio.to_thread(supports_direct_io, target.parent)
    args = qemu_img_convert_args(source, in_format, target, out_format, compress=compress,
                                 direct=direct, out_options=out_options)
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True, pass_fds=fds_in(args))
    try:
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        await _read_progress(proc.stdout, on_fraction)
        stderr = (await stderr_task).decode("utf-8", "replace")
        rc = await proc.wait()
    except BaseException:
        kill_group(proc)
        await proc.wait()
        raise
    if rc != 0:
        raise Failed(f"{source}: qemu-img convert failed: {_last_line(stderr)}")


async def _read_progress(stream: asyncio.StreamReader,
                         on_fraction: Callable[[float], None]) -> None:
    pending = b""
    while chunk := await stream.read(4096):
        pending += chunk
        matches = list(_PROGRESS_RE.finditer(pending))
        if matches:
            on_fraction(float(matches[-1].group(1)) / 100.0)
            pending = pending[matches[-1].end():]
        pending = pending[-64:]


def kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


