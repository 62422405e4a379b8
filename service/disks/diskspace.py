"""Refuse work that cannot fit: free space is checked before a download starts."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import Failed


def human_bytes(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def check_free_space(path: Path, needed_bytes: int, what: str = "the export",
                     shown: Path | None = None) -> int:
    """Return the free bytes at `path` (known to users as `shown`, when it is a path
    through a descriptor), or raise Failed saying how much is needed and free."""
    free = free_bytes(path)
    if free < needed_bytes:
        raise Failed(f"not enough free space in {shown or path}: {what} needs "
                     f"{human_bytes(needed_bytes)} "
                     f"({needed_bytes} bytes), only {human_bytes(free)} ({free} bytes) are free")
    return free
