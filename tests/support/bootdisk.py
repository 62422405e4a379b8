"""A tiny bootable disk: its boot sector prints a line on COM1, so a test can see a VM boot."""
from __future__ import annotations

from pathlib import Path

BOOT_LINE = b"HYPERSDK BOOT OK"

# x86 real mode at 0x7C00: ds=0; dx=0x3F8 (COM1); si=message; out each byte until NUL; halt.
def _print_code(message_at: int) -> bytes:
    return bytes([
        0x31, 0xC0,              # xor ax, ax
        0x8E, 0xD8,              # mov ds, ax
        0xFC,                    # cld
        0xBA, 0xF8, 0x03,        # mov dx, 0x3F8
        0xBE, *message_at.to_bytes(2, "little"),  # mov si, message (right after the code)
        0xAC,                    # next: lodsb
        0x08, 0xC0,              # or al, al
        0x74, 0x03,              # jz halt
        0xEE,                    # out dx, al
        0xEB, 0xF8,              # jmp next
        0xF4,                    # halt: hlt
        0xEB, 0xFD,              # jmp halt
    ])


def _wait_code(seconds: float) -> bytes:
    """The BIOS's wait (int 15h, ah=86h, cx:dx microseconds) before printing."""
    micros = int(seconds * 1_000_000)
    return bytes([
        0xB4, 0x86,                                          # mov ah, 0x86
        0xB9, *(micros >> 16).to_bytes(2, "little"),         # mov cx, high word
        0xBA, *(micros & 0xFFFF).to_bytes(2, "little"),      # mov dx, low word
        0xCD, 0x15,                                          # int 0x15
    ])


def boot_sector(delay: float = 0) -> bytes:
    """A 512-byte MBR that prints BOOT_LINE on the first serial port (after waiting
    `delay` seconds), then halts."""
    wait = _wait_code(delay) if delay else b""
    code = wait + _print_code(0x7C00 + len(wait) + 0x16)
    body = code + BOOT_LINE + b"\r\n\0"
    return body + bytes(510 - len(body)) + b"\x55\xaa"


def write_boot_disk(path: Path, size: int = 1024 * 1024, delay: float = 0) -> Path:
    """A raw disk whose first sector is boot_sector(delay); the rest is a hole."""
    with open(path, "wb") as handle:
        handle.write(boot_sector(delay))
        handle.truncate(size)
    return path
