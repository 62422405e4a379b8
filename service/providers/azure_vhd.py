"""The footer of a fixed VHD (what Azure managed disks are downloaded as).

A fixed VHD is the raw disk followed by a 512-byte footer: the cookie "conectix",
the disk's size at offset 48, the disk type at offset 60 (2 = fixed) and at 64 a
checksum, the one's complement of the sum of all other footer bytes. Checking it
after a download proves the file is whole and is what qemu-img reads as `vpc`.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import Failed

FOOTER_SIZE = 512
FIXED_DISK = 2


def footer_checksum(footer: bytes) -> int:
    return ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF


def check_fixed_vhd(path: Path) -> int:
    """Return the disk size the footer of `path` states; Failed naming the file if not a fixed VHD."""
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        if file_size < FOOTER_SIZE:
            raise Failed(f"{path.name}: {file_size} bytes is too short for a VHD")
        handle.seek(file_size - FOOTER_SIZE)
        footer = handle.read(FOOTER_SIZE)
    if footer[:8] != b"conectix":
        raise Failed(f"{path.name}: no VHD footer (cookie 'conectix') in the last 512 bytes")
    current_size, = struct.unpack(">Q", footer[48:56])
    disk_type, checksum = struct.unpack(">II", footer[60:68])
    if checksum != footer_checksum(footer):
        raise Failed(f"{path.name}: the VHD footer checksum does not match")
    if disk_type != FIXED_DISK:
        raise Failed(f"{path.name}: VHD disk type {disk_type}, expected 2 (fixed)")
    if current_size != file_size - FOOTER_SIZE:
        raise Failed(f"{path.name}: the VHD footer states {current_size} bytes of disk but the "
                     f"file holds {file_size - FOOTER_SIZE}")
    return current_size
