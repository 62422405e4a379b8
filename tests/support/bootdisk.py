"""A tiny bootable disk: its boot sector prints a line on COM1, so a test can see a VM boot."""
from __future__ import annotations

from pathlib import Path

BOOT_LINE = b"HYPERSDK BOOT OK"

# x86 real mode at 0x7C00: ds=0; dx=0x3F8 (COM1); si=message; out each byte until NUL; halt.
_BOOT_CODE = bytes([
    0x31, 0xC0,              # xor ax, ax
    0x8E, 0xD8,              # mov ds, ax
    0xFC,                    # cld
    0xBA, 0xF8, 0x03,        # mov dx, 0x3F8
    0xBE, 0x16, 0x7C,        # mov si, 0x7C16 (the message, right after this code)
    0xAC,                    # next: lodsb
    0x08, 0xC0,              # or al, al
    0x74, 0x03,              # jz halt
    0xEE,                    # out dx, al
    0xEB, 0xF8,              # jmp next
    0xF4,                    # halt: hlt
    0xEB, 0xFD,              # jmp halt
])


def boot_sector() -> bytes:
    """A 512-byte MBR that prints BOOT_LINE on the first serial port, then halts."""
    assert len(_BOOT_CODE) == 0x16
    body = _BOOT_CODE + BOOT_LINE + b"\r\n\0"
    return body + bytes(510 - len(body)) + b"\x55\xaa"


def write_boot_disk(path: Path, size: int = 1024 * 1024) -> Path:
    """A raw disk whose first sector is boot_sector(); the rest is a hole."""
    with open(path, "wb") as handle:
        handle.write(boot_sector())
        handle.truncate(size)
    return path
