"""What the AWS provider tests check EBS images with."""
from __future__ import annotations

import hashlib
import os

BLOCK = 512  # moto's EBS block size (AWS uses 512 KiB; the code reads it from the API)


def block_of(seed: str) -> bytes:
    return hashlib.sha512(seed.encode()).digest() * (BLOCK // 64)


def data_ranges(path) -> list[tuple[int, int]]:
    """(start, end) of every range the filesystem stores data for."""
    ranges, offset = [], 0
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        while offset < size:
            try:
                start = os.lseek(handle.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(handle.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, end))
            offset = end
    return ranges


def assert_image_holds(path, blocks: dict[int, bytes]) -> None:
    """The image is the blocks at their offsets and zeros everywhere else."""
    assert path.stat().st_size == 1024 ** 3
    with open(path, "rb") as handle:
        for index, data in blocks.items():
            handle.seek(index * BLOCK)
            assert handle.read(BLOCK) == data, f"block {index}"
        for start, end in data_ranges(path):
            handle.seek(start)
            chunk = bytearray(handle.read(end - start))
            for index in blocks:
                lo, hi = max(index * BLOCK, start), min((index + 1) * BLOCK, end)
                if lo < hi:
                    chunk[lo - start:hi - start] = bytes(hi - lo)
            assert not any(chunk), f"stray data in {start}-{end}"
