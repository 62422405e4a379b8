"""File-system primitives for a root service that must not be steered by planted links.

- `open_beneath` opens a path relative to a directory fd with openat2(2): the kernel
  refuses any resolution that leaves the directory (`..`, absolute or escaping
  symlinks, magic links), so no check-then-open race exists.
- `fd_path` names an open directory as `/proc/self/fd/N`: a path through it reaches the
  directory the fd holds even if someone renames it or plants a link at its old name,
  and child processes given that fd (`pass_fds`) can use the same path.
- `fsync_dir`, `fsync_file`: durability of a rename and of a file's data.
- `pwrite_all`: all of a buffer at an offset (pwrite may write less than asked).

All functions block: call them in a thread when they may touch large files.
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import struct
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (a "new" syscall)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_FD_PATH_RE = re.compile(r"/proc/self/fd/(\d+)")


def _raise_errno(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), what)


def open_beneath(dir_fd: int, relative: str, flags: int, mode: int = 0o600) -> int:
    """openat2(dir_fd, relative) that may not resolve outside dir_fd (symlinks that stay
    inside are followed). EXDEV means the path tried to leave; ELOOP a symlink loop."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                      RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    buffer = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(relative), buffer, len(how))
    if fd < 0:
        _raise_errno(relative)
    return fd


def name_exists(dir_fd: int, name: str) -> bool:
    """Whether anything (a file, a link, ...) is named `name` in the directory `dir_fd`."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    return True


def fd_path(fd: int) -> Path:
    """`/proc/self/fd/<fd>`: the open directory, by a path nobody can redirect."""
    return Path(f"/proc/self/fd/{fd}")


def fds_in(args: list[str]) -> tuple[int, ...]:
    """The fds that `fd_path` paths in a command line refer to, for `pass_fds`."""
    return tuple(sorted({int(match) for arg in args for match in _FD_PATH_RE.findall(arg)}))


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` (thread-safe: no file position)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def fsync_dir(path_or_fd: Path | int) -> None:
    """Make a rename inside the directory durable."""
    if isinstance(path_or_fd, int):
        os.fsync(path_or_fd)
        return
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(target: Path) -> Path:
    """The one temporary-name convention: hidden, random, next to `target`, so that the
    final rename stays on one filesystem and no two writers (or a planted file) share it.
    Inside a job's staging directory (staging.py) nobody else can create it anyway."""
    return target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
