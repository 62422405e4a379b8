"""DirectFile and supports_direct_io against real files (tmp_path is ext4, which allows O_DIRECT)."""
from __future__ import annotations

import mmap
import os
import random
import threading

import pytest

from hypersdk.service.direct_io import DirectFile, supports_direct_io

from ..support.direct_io import fake_refusing_o_direct
from ..support.pagecache import cached_bytes

PAGE = 4096
ODD_PIECES = (1, 4095, 4097, 65536 + 3)


def _background(path, size: int, seed: int = 7) -> bytearray:
    """Fill `path` with `size` random bytes; return them (the expected content so far)."""
    data = bytearray(random.Random(seed).randbytes(size))
    path.write_bytes(data)
    return data


def _mapped(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    return buffer


def test_pwrite_of_a_mapped_view_skips_the_page_cache_except_its_tail(tmp_path):
    path = tmp_path / "out"
    data = random.Random(1).randbytes(3 * (1 << 20) + 1234)
    buffer = _mapped(data)
    out = DirectFile(path, os.O_RDWR | os.O_CREAT)
    try:
        assert out.direct
        out.pwrite(buffer, 0)
    finally:
        out.close()
        buffer.close()
    assert cached_bytes(path) <= PAGE, "the aligned part went through the page cache"
    assert path.read_bytes() == data


def test_pwrite_at_an_unaligned_offset(tmp_path):
    path = tmp_path / "out"
    expected = _background(path, 256 * 1024)
    data = random.Random(2).randbytes(3 * PAGE)
    buffer = _mapped(data)
    out = DirectFile(path, os.O_RDWR)
    try:
        out.pwrite(buffer, 5000)
        out.pwrite(memoryview(buffer)[:PAGE + 17], 100 * 1024 - 3)
    finally:
        out.close()
        buffer.close()
    expected[5000:5000 + len(data)] = data
    expected[100 * 1024 - 3:100 * 1024 + PAGE + 14] = data[:PAGE + 17]
    assert path.read_bytes() == expected


@pytest.mark.parametrize("offset", [0, 64 * 1024, 4096 * 3, 1, 4095, 70001])
def test_pwrite_pieces_of_odd_sizes(tmp_path, offset):
    path = tmp_path / "out"
    expected = _background(path, 256 * 1024)
    rng = random.Random(offset)
    pieces = [rng.randbytes(size) for size in ODD_PIECES]
    joined = b"".join(pieces)
    out = DirectFile(path, os.O_RDWR)
    try:
        out.pwrite_pieces(pieces, offset)
        out.pwrite_pieces([b"", pieces[0], b""], offset + len(joined))  # empty pieces too
    finally:
        out.close()
    expected[offset:offset + len(joined) + 1] = joined + pieces[0]
    assert path.read_bytes() == expected


def test_pwrite_pieces_from_several_threads_on_disjoint_ranges(tmp_path):
    threads, ranges, stride = 4, 64, 64 * 1024
    path = tmp_path / "out"
    expected = bytearray(random.Random(9).randbytes(threads * ranges * stride))
    runs = {}
    for index in range(threads * ranges):
        length = stride - (index % 3) * 1001  # some runs end mid-page
        start = index * stride
        run = bytes(expected[start:start + length])
        cuts = [0, 1, 4096, 8193, length]
        runs[index] = [run[a:b] for a, b in zip(cuts, cuts[1:])]
    path.write_bytes(bytes(len(expected)))
    for index in range(threads * ranges):  # what the short runs leave untouched stays zero
        start = index * stride
        end = start + sum(map(len, runs[index]))
        expected[end:start + stride] = bytes(start + stride - end)
    out = DirectFile(path, os.O_RDWR)
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        try:
            barrier.wait()
            for index in range(first, threads * ranges, threads):
                out.pwrite_pieces(runs[index], index * stride)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    try:
        assert out.direct
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
    finally:
        out.close()
    assert not errors
    assert path.read_bytes() == expected


def test_pwrite_pieces_of_nothing_writes_nothing(tmp_path):
    path = tmp_path / "out"
    expected = _background(path, 8192)
    out = DirectFile(path, os.O_RDWR)
    try:
        out.pwrite_pieces([], 4096)
    finally:
        out.close()
    assert path.read_bytes() == expected


def test_fake_filesystem_refusing_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    path = tmp_path / "out"
    expected = _background(path, 128 * 1024)
    fake_refusing_o_direct(monkeypatch)
    rng = random.Random(4)
    pieces = [rng.randbytes(size) for size in ODD_PIECES]
    data = rng.randbytes(2 * PAGE + 5)
    buffer = _mapped(data)
    out = DirectFile(path, os.O_RDWR)
    try:
        assert out.direct is False
        out.pwrite_pieces(pieces, 0)
        out.pwrite(buffer, 80 * 1024)
    finally:
        out.close()
        buffer.close()
    monkeypatch.undo()
    joined = b"".join(pieces)
    expected[:len(joined)] = joined
    expected[80 * 1024:80 * 1024 + len(data)] = data
    assert cached_bytes(path) >= len(joined), "ordinary writes should sit in the page cache"
    assert path.read_bytes() == expected


def test_supports_direct_io_probe(tmp_path):
    assert supports_direct_io(tmp_path) is True
    assert os.listdir(tmp_path) == []


def test_supports_direct_io_under_a_fake_refusal(tmp_path, monkeypatch):
    fake_refusing_o_direct(monkeypatch)
    assert supports_direct_io(tmp_path) is False
    assert os.listdir(tmp_path) == [], "the probe file was left behind"


def test_close_twice_is_harmless(tmp_path):
    """The second close must not close descriptors that reused the numbers meanwhile."""
    out = DirectFile(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    numbers = {out.fd, out._direct_fd}
    out.close()
    reused = [os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT) for _ in range(2)]
    try:
        assert set(reused) == numbers  # the lowest free numbers: the ones just closed
        out.close()
        for fd in reused:
            os.fstat(fd)  # still open
    finally:
        for fd in reused:
            os.close(fd)
