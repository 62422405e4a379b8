"""convert_image with real qemu-img: every input format, sparseness, progress, cancel."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest

from hypersdk.service.errors import Failed, InvalidArgument
from hypersdk.service.disks.convert import convert_image, detect_format
from hypersdk.service.disks.streamopt import GrowingFile, decode

from ..support.direct_io import fake_refusing_o_direct
from ..support.growing import WatchedGrowingFile
from ..support.pagecache import cached_bytes
from ..support.wait import until
from .helpers import (DATA_BYTES, DISK_SIZE, MiB, allocated, images_equal, make_image,
                      grain_ends, make_raw, qemu_img)

INPUTS = [("vmdk", "streamOptimized"), ("vmdk", "monolithicSparse"), ("vpc", None), ("vpc", "fixed"),
          ("vhdx", None), ("raw", None), ("qcow2", None)]
# Output allocation may round each data extent up to a 64 KiB cluster / 1 MiB block.
SPARSE_LIMIT = DATA_BYTES + 4 * (1 << 20)


@pytest.mark.parametrize("fmt,subformat", INPUTS)
@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
async def test_convert_keeps_content_and_holes(tmp_path, fmt, subformat, out_format):
    raw, image = make_image(tmp_path, fmt, subformat=subformat)
    target = tmp_path / "out" / f"disk.{out_format}"
    target.parent.mkdir()
    seen: list[tuple[int, int]] = []
    result = await convert_image(image, target, out_format=out_format,
                                 on_progress=lambda d, t: seen.append((d, t)))
    assert result.path == target and result.format == out_format
    assert result.virtual_size == DISK_SIZE
    assert detect_format(target) == out_format
    if out_format == "qcow2":
        qemu_img("check", target)
    assert images_equal(raw, target)
    assert allocated(target) < SPARSE_LIMIT, "output lost its holes"
    assert result.actual_size == allocated(target)
    assert seen[-1] == (DISK_SIZE, DISK_SIZE)
    assert [d for d, _t in seen] == sorted(d for d, _t in seen), "progress went backwards"
    assert os.listdir(target.parent) == [target.name], "a temporary file was left behind"


DENSE = 8 * MiB  # enough data that qcow2's own metadata (cached) is a small part


def _dense_vhdx(tmp_path):
    raw = make_raw(tmp_path / "dense.raw", DENSE, extents=((0, DENSE),))
    qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, tmp_path / "dense.vhdx")
    return raw, tmp_path / "dense.vhdx"


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
async def test_qemu_img_writes_past_the_page_cache(tmp_path, out_format):
    """qemu-img writes uncompressed output with -t none (O_DIRECT): the converted image
    is not left in the page cache (with writeback caching all of its data would be)."""
    raw, image = _dense_vhdx(tmp_path)
    result = await convert_image(image, tmp_path / f"out.{out_format}", out_format=out_format)
    assert result.actual_size >= DENSE
    assert cached_bytes(result.path) < DENSE // 8  # before the compare reads it
    assert images_equal(raw, result.path)


async def test_convert_without_o_direct_fake_filesystem(tmp_path, monkeypatch):
    """Where the filesystem refuses O_DIRECT (faked: the probe's open fails with EINVAL,
    as on such filesystems) qemu-img writes through the page cache instead."""
    raw, image = _dense_vhdx(tmp_path)
    fake_refusing_o_direct(monkeypatch)
    result = await convert_image(image, tmp_path / "out.qcow2", out_format="qcow2")
    monkeypatch.undo()
    assert cached_bytes(result.path) >= DENSE // 2
    assert images_equal(raw, result.path)


async def test_compressed_qcow2(tmp_path):
    raw = make_raw(tmp_path / "zeros-and-text.raw", extents=())
    with open(raw, "r+b") as fh:
        fh.write(b"compressible text " * 100000)
    plain = await convert_image(raw, tmp_path / "plain.qcow2", out_format="qcow2")
    small = await convert_image(raw, tmp_path / "small.qcow2", out_format="qcow2", compress=True)
    assert images_equal(raw, small.path)
    assert small.actual_size < plain.actual_size / 4


async def test_detect_format_ignores_the_extension(tmp_path):
    _raw, image = make_image(tmp_path, "vpc")
    liar = tmp_path / "disk.qcow2"
    image.rename(liar)
    assert detect_format(liar) == "vpc"
    result = await convert_image(liar, tmp_path / "disk.raw", out_format="raw")
    assert result.virtual_size >= DISK_SIZE


async def test_backing_file_is_refused(tmp_path):
    _raw, base = make_image(tmp_path, "qcow2")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    with pytest.raises(InvalidArgument, match="backing file are refused"):
        await convert_image(overlay, tmp_path / "out.qcow2", out_format="qcow2")


async def test_bad_options(tmp_path):
    _raw, image = make_image(tmp_path, "raw")
    with pytest.raises(InvalidArgument, match="format: must be one of qcow2, raw"):
        await convert_image(image, tmp_path / "x.vdi", out_format="vdi")
    with pytest.raises(InvalidArgument, match="only qcow2 output can be compressed"):
        await convert_image(image, tmp_path / "x.raw", out_format="raw", compress=True)


async def test_truncated_stream_optimized_is_refused_without_output(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    with open(vmdk, "r+b") as fh:
        fh.truncate(vmdk.stat().st_size // 2 + 100)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Failed, match="the VMDK is incomplete"):
        await convert_image(vmdk, out / "disk.qcow2", out_format="qcow2")
    assert os.listdir(out) == []


def test_decoder_refuses_a_stream_cut_before_its_end_marker(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    with open(vmdk, "r+b") as fh:
        fh.truncate(vmdk.stat().st_size // 2 + 100)
    with pytest.raises(Failed) as err:
        decode(vmdk, tmp_path / "out.raw")
    assert str(vmdk) in str(err.value)
    assert "without its end-of-stream marker" in str(err.value)


def test_decoder_is_byte_identical_and_sparse(tmp_path):
    raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    out = tmp_path / "decoded.raw"
    assert decode(vmdk, out, workers=2) == DISK_SIZE
    assert out.stat().st_size == DISK_SIZE
    assert images_equal(raw, out)
    assert allocated(out) < SPARSE_LIMIT


def test_decoder_reads_vmware_style_footer(tmp_path):
    """VMware puts GD_AT_END in the header and GT/GD/footer markers before the EOS marker."""
    raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    data = bytearray(vmdk.read_bytes())
    header = bytes(data[:512])
    end = len(data.rstrip(b"\0"))
    end = (end + 511) // 512 * 512
    gd_at_end = header[:56] + (0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + header[64:]
    gt_marker = (4).to_bytes(8, "little") + bytes(4) + (1).to_bytes(4, "little")
    footer_marker = (1).to_bytes(8, "little") + bytes(4) + (3).to_bytes(4, "little")
    tail = (gt_marker.ljust(512, b"\0") + bytes(4 * 512) + footer_marker.ljust(512, b"\0")
            + header + bytes(512))
    vmware = tmp_path / "vmware.vmdk"
    vmware.write_bytes(gd_at_end + bytes(data[512:end]) + tail)
    out = tmp_path / "decoded.raw"
    decode(vmware, out)
    assert images_equal(raw, out)


async def test_cancel_of_qemu_img_removes_partial_output_and_process(tmp_path):
    size = 96 << 20
    source = make_raw(tmp_path / "big.raw", size, extents=[(0, size)])
    out = tmp_path / "out"
    out.mkdir()
    started = asyncio.Event()
    task = asyncio.create_task(convert_image(
        source, out / "disk.qcow2", out_format="qcow2", compress=True,
        on_progress=lambda d, t: started.set()))
    await asyncio.wait_for(started.wait(), 30)  # qemu-img is converting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(out) == []
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_convert_of(p, out)]


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
async def test_cancel_of_the_decoder_removes_partial_output(tmp_path, out_format):
    """The decoder is mid-stream (half the file has arrived) when the task is cancelled."""
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    partial = tmp_path / "downloading.vmdk"
    growing = GrowingFile()
    half = vmdk.read_bytes()[:vmdk.stat().st_size // 2]
    partial.write_bytes(half)
    growing.grew(len(half))
    out = tmp_path / "out"
    out.mkdir()
    started = asyncio.Event()
    task = asyncio.create_task(convert_image(
        partial, out / f"disk.{out_format}", out_format=out_format, growing=growing,
        log=lambda message: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    await until(lambda: os.listdir(out), 30, "the decoder to start writing")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(out) == []


def _is_convert_of(pid: str, out) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return False
    return b"qemu-img" in cmdline and str(out).encode() in cmdline


def test_decoder_refuses_a_grain_given_twice(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    data = vmdk.read_bytes()
    overhead = int.from_bytes(data[64:72], "little") * 512
    size = int.from_bytes(data[overhead + 8:overhead + 12], "little")
    first = data[overhead:overhead + (12 + size + 511) // 512 * 512]
    doubled = tmp_path / "doubled.vmdk"
    doubled.write_bytes(data[:overhead] + first + data[overhead:])
    with pytest.raises(Failed, match="a second grain for sector 0"):
        decode(doubled, tmp_path / "out.raw")


def test_decoder_refuses_a_stream_cut_at_a_grain_boundary(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    with open(vmdk, "r+b") as fh:
        fh.truncate(grain_ends(vmdk)[0])
    with pytest.raises(Failed, match="truncated: its grain tables point past the end"):
        decode(vmdk, tmp_path / "out.raw")


def _feed(source, growing_path, growing: GrowingFile, upto: int | None = None,
          caught_up: Callable[[], None] = lambda: None) -> None:
    """A fake download: copy `source` into `growing_path` in pieces, announcing each;
    after each, `caught_up()` (e.g. until the decoder waits for the next)."""
    data = source.read_bytes()[:upto]
    with open(growing_path, "wb") as out:
        for offset in range(0, len(data), 32 * 1024):
            out.write(data[offset:offset + 32 * 1024])
            out.flush()
            growing.grew(out.tell())
            if out.tell() < len(data):
                caught_up()
    growing.finish()


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
async def test_convert_keeps_pace_with_a_download(tmp_path, out_format):
    raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    partial = tmp_path / "downloading.vmdk"
    growing = WatchedGrowingFile()
    partial.touch()
    # each piece lands once the converter has taken the one before and waits for more
    feeder = threading.Thread(target=_feed, args=(vmdk, partial, growing),
                              kwargs={"caught_up": growing.decoder_caught_up})
    feeder.start()
    try:
        result = await convert_image(
            partial, tmp_path / f"disk.{out_format}", out_format=out_format, growing=growing)
    finally:
        feeder.join()
    assert images_equal(raw, result.path)


async def test_download_that_stops_early_fails(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    partial = tmp_path / "downloading.vmdk"
    growing = GrowingFile()
    _feed(vmdk, partial, growing, upto=grain_ends(vmdk)[1] - 700)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Failed, match="truncated inside the grain"):
        await convert_image(partial, tmp_path / "disk.qcow2", out_format="qcow2", growing=growing)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written is left


def test_a_fixed_vhd_is_recognised_by_its_footer(tmp_path):
    """qemu-img's probe calls a fixed VHD raw; read as raw, its footer would become data."""
    _raw, image = make_image(tmp_path, "vpc", subformat="fixed")
    assert detect_format(image) == "vpc"
    plain = make_raw(tmp_path / "plain.raw", DISK_SIZE)
    assert detect_format(plain) == "raw"
