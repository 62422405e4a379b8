"""Resuming a download after its job was interrupted: re-check what is on disk, keep the
verified bytes.

A download records checkpoints as it goes (disk_writer.py): once some bytes are on disk
(fdatasync), their end offset and the SHA-256 of everything before it, taken from a copy
of the running hash, so recording costs no second pass over the data. To resume, the file
is read again from its start and hashed; at each checkpoint the hash must match. The
download goes on after the last checkpoint that matched, with the hash state reached
there, so its final SHA-256 covers the whole file as if it had arrived in one go. Bytes
after that checkpoint (written, but not yet recorded, or changed since) are cut off.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import Cancelled
from ..model import Checkpoint

VERIFY_BLOCK = 4 << 20


@dataclass
class ResumePoint:
    """Where a download goes on: `offset` verified bytes, the hash state after them."""

    offset: int
    hasher: Any  # hashlib's sha256 object (its type is private)
    complete: bool = False  # the verified bytes are the whole download

    @classmethod
    def start(cls) -> "ResumePoint":
        return cls(0, hashlib.sha256())


def verify(fd: int, checkpoints: list[Checkpoint], stop: threading.Event,
           on_bytes: Callable[[int], None] = lambda _: None) -> ResumePoint:
    """The longest prefix of the open file `fd` that ends at a checkpoint whose hash
    matches (blocking; `stop` ends it with Cancelled). `on_bytes(n)` counts what was read."""
    hasher = hashlib.sha256()
    buffer = bytearray(VERIFY_BLOCK)
    done = 0
    point = ResumePoint.start()
    for checkpoint in sorted(checkpoints, key=lambda c: c.offset):
        while done < checkpoint.offset:
            if stop.is_set():
                raise Cancelled("verifying the interrupted download cancelled")
            with memoryview(buffer) as view:
                piece = view[:min(len(buffer), checkpoint.offset - done)]
                nbytes = os.preadv(fd, [piece], done)
                if not nbytes:
                    return point  # the file ends before this checkpoint
                hasher.update(piece[:nbytes])
            done += nbytes
            on_bytes(nbytes)
        if hasher.hexdigest() != checkpoint.sha256:
            return point
        point = ResumePoint(done, hasher.copy(), checkpoint.final)
    return point
