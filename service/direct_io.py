"""Writing bulk disk data past the page cache (O_DIRECT), where the filesystem allows it.

Downloads, our streamOptimized decoder and qemu-img's output write whole disks. On
the 2-core test machine, filling the page cache costs about 1.5 CPU-seconds per GiB
in the kernel (page allocation and copy, then writeback), more than receiving,
hashing or inflating the same bytes; with O_DIRECT the kernel hands the buffer to
the device and the data is on disk when the write returns, so a final fsync is
short and the page cache (the machine's memory) stays flat however large the disk.

O_DIRECT wants the buffer address, the file offset and the length aligned to the
device's logical block: `DirectFile` writes the aligned part of each run directly
and its unaligned tail through a second, ordinary descriptor of the same file.
Some filesystems refuse O_DIRECT (EINVAL at open); they get ordinary writes.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import uuid
from pathlib import Path
from typing import Sequence

# 4 KiB covers both 512-byte and 4 KiB logical blocks.
DIRECT_IO_ALIGNMENT = 4096


def align_up(n: int) -> int:
    return -(-n // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT


def open_direct(path: Path, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """Open `path` with O_DIRECT where its filesystem allows it, else without;
    returns the descriptor and whether it is direct."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags, mode), False


_libc = ctypes.CDLL(None)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def reserve_space(fd: int, offset: int, length: int) -> bool:
    """Allocate `length` bytes of the file at `offset` (fallocate(2); the file grows to
    cover them), so that direct writes there later land in allocated blocks. Only an
    optimisation, so any refusal is just False: no fallocate on this filesystem, no
    room left or a file size limit (a write that truly needs the space fails then).
    Not os.posix_fallocate, which writes zeros instead where fallocate is missing."""
    return _libc.fallocate(fd, 0, offset, length) == 0


def supports_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (probed with a hidden file)."""
    probe = Path(directory) / f".direct-io-probe-{uuid.uuid4().hex[:8]}"
    try:
        fd, direct = open_direct(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.close(fd)
        return direct
    finally:
        probe.unlink(missing_ok=True)


class DirectFile:
    """A file opened for writing twice: `fd` ordinary (metadata, tails, fsync, truncate),
    and a direct descriptor used by `pwrite` / `pwrite_pieces` for bulk data.

    Safe to use from several threads at once for different ranges; callers keep
    bulk ranges and `fd` writes on different 4 KiB pages.
    """

    def __init__(self, path: Path, flags: int, mode: int = 0o600) -> None:
        self.fd = os.open(path, flags | os.O_CLOEXEC, mode)
        try:
            self._direct_fd, self.direct = open_direct(
                path, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        self._scratch = threading.local()  # each thread's aligned copy buffer

    def pwrite(self, view: memoryview | mmap.mmap, offset: int) -> None:
        """Write all of `view` at `offset`; `view` must start page-aligned (an mmap)."""
        view = memoryview(view)
        aligned = len(view) - len(view) % DIRECT_IO_ALIGNMENT
        if not self.direct or offset % DIRECT_IO_ALIGNMENT:
            aligned = 0
        if aligned:
            self._write_all(self._direct_fd, view[:aligned], offset)
        if aligned < len(view):
            self._write_all(self.fd, view[aligned:], offset + aligned)

    def pwrite_pieces(self, pieces: Sequence[bytes], offset: int) -> None:
        """Write `pieces` back to back at `offset` (copied into an aligned buffer first)."""
        total = sum(len(piece) for piece in pieces)
        if not total:
            return
        if not self.direct or offset % DIRECT_IO_ALIGNMENT:
            self._write_all(self.fd, memoryview(b"".join(pieces)), offset)
            return
        buffer = self._buffer(total)
        position = 0
        for piece in pieces:
            buffer[position:position + len(piece)] = piece
            position += len(piece)
        self.pwrite(memoryview(buffer)[:total], offset)

    def _buffer(self, size: int) -> mmap.mmap:
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._scratch.buffer = mmap.mmap(-1, align_up(size))
        return buffer

    def _write_all(self, fd: int, view: memoryview, offset: int) -> None:
        while view:
            try:
                written = os.pwrite(fd, view, offset)
            except OSError as exc:
                if fd != self._direct_fd or exc.errno != errno.EINVAL:
                    raise
                # a device whose logical block is larger than DIRECT_IO_ALIGNMENT
                self.direct = False
                fd = self.fd
                continue
            view, offset = view[written:], offset + written

    def close(self) -> None:
        """Close both descriptors (once; later calls do nothing)."""
        if self.fd >= 0:
            os.close(self._direct_fd)
            os.close(self.fd)
            self.fd = self._direct_fd = -1
