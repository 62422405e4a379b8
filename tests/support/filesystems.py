"""Real small filesystems for tests of a full disk."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ("4m") mounted on `directory` (made if missing), unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                   check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of `directory` up to `leave` free bytes with one file."""
    filler = directory / "filler"
    stats = os.statvfs(directory)
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler
