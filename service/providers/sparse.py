"""A raw disk image written block by block at offsets, with unwritten ranges left as holes.

Cloud block APIs (EBS direct) hand out a disk as numbered blocks, in any order and
only where data exists. `SparseImage` writes each block with `os.pwrite` at its
offset (safe from several threads at once) into a temporary file of the full disk
size, so blocks never fetched stay holes and cost no space. `commit()` fsyncs and
renames it into place; `discard()` removes it. `copy_sparse` copies an earlier image
hole for hole (the base of an incremental export).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import Failed
from ..disks.download import file_sha256
from ..files import fsync_dir, pwrite_all, temp_path_for


class SparseImage:
    """A temporary file of `size` bytes next to `target`; becomes `target` on commit()."""

    def __init__(self, target: Path, size: int, base: Path | None = None) -> None:
        self.target = Path(target)
        self.size = size
        self.temp = temp_path_for(self.target)
        self._fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if base is not None:
                copy_sparse(Path(base), self._fd)
            os.ftruncate(self._fd, size)
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset` (thread-safe); it must lie inside the image."""
        if offset < 0 or offset + len(data) > self.size:
            raise Failed(f"{self.target.name}: a block at byte {offset} of {len(data)} bytes lies "
                         f"outside the image of {self.size} bytes")
        pwrite_all(self._fd, data, offset)

    def commit(self) -> str:
        """fsync, rename to the target name and return the file's sha256 (hex)."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        _, digest = file_sha256(self.temp)
        os.replace(self.temp, self.target)
        fsync_dir(self.target.parent)
        return digest

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.temp.unlink(missing_ok=True)


def copy_sparse(source: Path, dest_fd: int) -> None:
    """Copy `source` into the empty file `dest_fd`, data ranges only: holes stay holes."""
    src_fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(src_fd).st_size
        os.ftruncate(dest_fd, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
            _copy_range(src_fd, dest_fd, start, end - start)
            offset = end
    finally:
        os.close(src_fd)


def _copy_range(src_fd: int, dest_fd: int, offset: int, length: int) -> None:
    while length > 0:
        copied = os.copy_file_range(src_fd, dest_fd, min(length, 1 << 30), offset, offset)
        if copied == 0:
            raise OSError(f"copy_file_range stopped early at byte {offset}")
        offset += copied
        length -= copied


