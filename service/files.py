"""Landing files: write to a temporary name, fsync, rename, fsync the directory.

Every output of the service lands this way, so a crash leaves either the old state or
the whole new file, never half of one. Temporary names start with "." (hyper2kvm's
watcher and `ls` both pass over them). All functions block: call them in a thread.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_replace(temp: Path, target: Path) -> None:
    """fsync `temp`, rename it over `target`, fsync the directory."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, target)
    fsync_dir(Path(target).parent)


def write_atomic(target: Path, data: bytes) -> None:
    """Land small content (a descriptor, a manifest) at `target`; nothing is left on failure."""
    target = Path(target)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
        fsync_replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
