"""The streamOptimized decoder following a file that is still being written (a download).

The decoder reads its source with O_DIRECT at page-aligned offsets, so a growing file
that ends mid-page for now has that page read again once it grows; these tests grow
real files in awkward pieces, with ordinary and with O_DIRECT writes, and compare the
result with qemu-img.
"""
from __future__ import annotations

import itertools
import mmap
import os
import threading

import pytest

from hypersdk.service.direct_io import DirectFile
from hypersdk.service.errors import Cancelled, Failed
from hypersdk.service.disks import stream_reader
from hypersdk.service.disks.streamopt import decode

from ..support.direct_io import fake_refusing_o_direct
from ..support.growing import WatchedGrowingFile
from .helpers import MiB, grain_ends, images_equal, make_raw, qemu_img

DISK = 24 * MiB + 3 * 512  # the last grain is short
# data and holes: a grain-aligned run, runs that start and end mid-grain, the last bytes
SPARSE_EXTENTS = ((0, 64 * 1024), (3 * MiB + 4096, 200 * 1024), (13 * MiB + 777, 5000),
                  (DISK - 3000, 3000))
# random data does not compress: a VMDK of several MiB
DENSE_EXTENTS = ((MiB, 5 * MiB + 123), (17 * MiB, 1 * MiB))
AWKWARD_PIECES = (1, 511, 4095, 4097, MiB + 3)


def _stream_vmdk(tmp_path, name: str, extents) -> tuple:
    raw = make_raw(tmp_path / f"{name}.raw", DISK, extents=extents, seed=len(name))
    vmdk = tmp_path / f"{name}.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    return raw, vmdk


@pytest.fixture(scope="module")
def sparse_vmdk(tmp_path_factory):
    return _stream_vmdk(tmp_path_factory.mktemp("sparse"), "sparse", SPARSE_EXTENTS)


@pytest.fixture(scope="module")
def dense_vmdk(tmp_path_factory):
    raw, vmdk = _stream_vmdk(tmp_path_factory.mktemp("dense"), "dense", DENSE_EXTENTS)
    assert vmdk.stat().st_size > 5 * MiB
    return raw, vmdk


def _feed_awkward(data: bytes, path, growing: WatchedGrowingFile) -> None:
    """Ordinary writes in pieces of awkward sizes, pausing now and then so that the
    decoder catches up and finds the file ending mid-page."""
    with open(path, "r+b", buffering=0) as out:
        offset = 0
        for n, size in enumerate(itertools.cycle(AWKWARD_PIECES)):
            if offset >= len(data):
                break
            piece = data[offset:offset + size]
            out.write(piece)
            offset += len(piece)
            growing.grew(offset)
            if n % 3 == 1 and offset < len(data):
                growing.decoder_caught_up()


def _feed_like_a_download(data: bytes, path, growing: WatchedGrowingFile) -> None:
    """Whole 1 MiB blocks with O_DIRECT, the unaligned tail through the page cache."""
    out = DirectFile(path, os.O_RDWR)
    block = mmap.mmap(-1, MiB)
    try:
        assert out.direct
        for offset in range(0, len(data), MiB):
            chunk = data[offset:offset + MiB]
            block[:len(chunk)] = chunk
            out.pwrite(memoryview(block)[:len(chunk)], offset)
            growing.grew(offset + len(chunk))
            if offset + len(chunk) < len(data):
                growing.decoder_caught_up()
    finally:
        out.close()
        block.close()


def _decode_while_fed(vmdk, tmp_path, out_format: str, feed, upto: int | None = None):
    """Run `feed` on a thread into a growing copy of `vmdk` while decoding it; finish() it
    when the feeder is done. Returns the decoded file."""
    data = vmdk.read_bytes()[:upto]
    partial = tmp_path / "downloading.vmdk"
    partial.touch()
    growing = WatchedGrowingFile()
    errors: list[BaseException] = []

    def feeder() -> None:
        try:
            feed(data, partial, growing)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            growing.finish()

    thread = threading.Thread(target=feeder)
    target = tmp_path / f"decoded.{out_format}"
    thread.start()
    try:
        decode(partial, target, out_format=out_format, growing=growing)
    finally:
        thread.join(30)
        assert not errors
    return target


def _assert_identical(raw, target, out_format: str) -> None:
    if out_format == "qcow2":
        qemu_img("check", target)
    assert images_equal(raw, target)


def _record_reads(monkeypatch) -> list[tuple[int, int]]:
    """(offset, bytes read) of every os.preadv from now on (the real call, recorded)."""
    real_preadv = os.preadv
    reads: list[tuple[int, int]] = []

    def recording_preadv(fd, buffers, offset, *args):
        count = real_preadv(fd, buffers, offset, *args)
        reads.append((offset, count))
        return count

    monkeypatch.setattr(os, "preadv", recording_preadv)
    return reads


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
@pytest.mark.parametrize("image", ["sparse_vmdk", "dense_vmdk"])
def test_decode_follows_a_file_growing_in_awkward_pieces(tmp_path, request, monkeypatch, image,
                                                         out_format):
    raw, vmdk = request.getfixturevalue(image)
    reads = _record_reads(monkeypatch)
    target = _decode_while_fed(vmdk, tmp_path, out_format, _feed_awkward)
    _assert_identical(raw, target, out_format)
    size = vmdk.stat().st_size
    mid_page = [r for r in reads if r[1] % 4096 and r[0] + r[1] < size]
    if image == "dense_vmdk":  # the sparse one arrives whole with its first big piece
        assert mid_page, "the decoder never found the file ending mid-page while it grew"


@pytest.mark.parametrize("chunk", [4096, 64 * 1024])
def test_decode_with_small_read_chunks_follows_a_growing_file(tmp_path, dense_vmdk, monkeypatch,
                                                               chunk):
    """Many chunks, grains larger than two of them (the working buffer must grow), and
    the unread rest carried across refills."""
    monkeypatch.setattr(stream_reader, "CHUNK", chunk)
    raw, vmdk = dense_vmdk
    target = _decode_while_fed(vmdk, tmp_path, "raw", _feed_awkward)
    _assert_identical(raw, target, "raw")


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_decode_follows_a_download_writing_with_o_direct(tmp_path, dense_vmdk, out_format):
    raw, vmdk = dense_vmdk
    assert vmdk.stat().st_size % 4096, "the tail should end mid-page"
    target = _decode_while_fed(vmdk, tmp_path, out_format, _feed_like_a_download)
    _assert_identical(raw, target, out_format)


@pytest.mark.parametrize("cut", ["mid-grain", "grain-boundary", "mid-marker"])
def test_a_growing_file_that_stops_early_fails_as_truncated(tmp_path, dense_vmdk, cut):
    _raw, vmdk = dense_vmdk
    ends = grain_ends(vmdk)
    upto = {"mid-grain": ends[30] - 700, "grain-boundary": ends[30],
            "mid-marker": ends[30] + 5}[cut]
    with pytest.raises(Failed, match="truncated") as err:
        _decode_while_fed(vmdk, tmp_path, "qcow2", _feed_awkward, upto=upto)
    assert str(tmp_path / "downloading.vmdk") in str(err.value)


def test_truncated_growing_file_fails_soon_after_finish(tmp_path, dense_vmdk):
    _raw, vmdk = dense_vmdk
    upto = grain_ends(vmdk)[30] - 700
    data = vmdk.read_bytes()[:upto]
    partial = tmp_path / "downloading.vmdk"
    partial.write_bytes(data)
    growing = WatchedGrowingFile()
    growing.grew(len(data) // 2)

    waited: list[bool] = []

    def download_ends() -> None:  # once the decoder waits for the rest
        waited.append(growing.waiting.wait(60))
        growing.grew(len(data))
        growing.finish()
    before = set(threading.enumerate())
    downloader = threading.Thread(target=download_ends)
    downloader.start()
    with pytest.raises(Failed, match="truncated"):
        decode(partial, tmp_path / "out.raw", growing=growing)
    downloader.join()
    assert waited == [True], "the decoder did not wait for the file to grow"
    assert set(threading.enumerate()) <= before, "the decoder left a thread behind"


@pytest.mark.parametrize("present", ["nothing", "half"])
def test_stop_while_waiting_on_a_stalled_file_cancels(tmp_path, sparse_vmdk, present):
    _raw, vmdk = sparse_vmdk
    data = vmdk.read_bytes()
    partial = tmp_path / "downloading.vmdk"
    partial.write_bytes(data[:len(data) // 2] if present == "half" else b"")
    growing = WatchedGrowingFile()
    growing.grew(partial.stat().st_size)
    stop = threading.Event()
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            decode(partial, tmp_path / "out.qcow2", out_format="qcow2", growing=growing,
                   stop=stop)
            outcome.append(None)
        except BaseException as exc:  # checked by the main thread
            outcome.append(exc)

    before = set(threading.enumerate())
    thread = threading.Thread(target=run)
    thread.start()
    assert growing.waiting.wait(60), f"the decoder did not wait for the file to grow: {outcome}"
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome[0], Cancelled), outcome
    assert set(threading.enumerate()) <= before, "the decoder left a thread behind"


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_decode_of_a_finished_file_on_a_fake_filesystem_refusing_o_direct(
        tmp_path, sparse_vmdk, dense_vmdk, monkeypatch, out_format):
    direct_opens = fake_refusing_o_direct(monkeypatch)
    for raw, vmdk in (sparse_vmdk, dense_vmdk):
        target = tmp_path / f"{vmdk.stem}.{out_format}"
        assert decode(vmdk, target, out_format=out_format) == DISK
        _assert_identical(raw, target, out_format)
    assert len(direct_opens) >= 4, "the reader and the writer should both have tried O_DIRECT"


@pytest.mark.parametrize("shift_sectors", [8, 1, 3])
def test_stream_starting_off_a_page_boundary(tmp_path, sparse_vmdk, shift_sectors):
    """The header's overHead (where the markers start) is a count of 512-byte sectors:
    a VMware-style stream (GD at the end, an end-of-stream marker) whose markers start
    `shift_sectors` later than qemu puts them, not necessarily on a 4 KiB page."""
    raw, vmdk = sparse_vmdk
    data = vmdk.read_bytes()
    overhead = int.from_bytes(data[64:72], "little")
    end = -(-len(data.rstrip(b"\0")) // 512) * 512
    header = (data[:56] + (0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
              + (overhead + shift_sectors).to_bytes(8, "little") + data[72:512])
    shifted = tmp_path / "shifted.vmdk"
    shifted.write_bytes(header + data[512:overhead * 512] + bytes(512 * shift_sectors)
                        + data[overhead * 512:end] + bytes(512))
    target = tmp_path / "out.raw"
    assert decode(shifted, target) == DISK
    assert images_equal(raw, target)
