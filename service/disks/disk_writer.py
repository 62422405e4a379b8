"""A stream of bytes to a file: hashed on one thread, written on another, past the page cache.

`download.py` receives a disk image into this writer's buffers; while it fills one,
the previous one is being hashed (SHA-256) and the one before that written, so
receiving, hashing and writing overlap on separate threads (hashlib and os.pwrite
release the GIL). Three page-aligned buffers circulate: the receiver blocks when
all three are busy, so memory stays at three buffers whatever the disk's size.

The file is written with O_DIRECT where its filesystem allows it (`direct_io.py`
says why). Full buffers are a multiple of DIRECT_IO_ALIGNMENT and land at aligned
offsets; only the last, partial buffer has an unaligned tail, written without
O_DIRECT. Measured with bench/export.py on the 2-core test machine: receiving 2 GiB
costs ~0.7 CPU-s, hashing ~1.6, buffered writes another ~3 in the kernel, direct
writes almost nothing.

Checkpoints (resume.py): every `checkpoint_every` bytes the hashing thread takes a copy
of the hash so far; once the writing thread has written up to there it fdatasyncs the
file and calls `on_checkpoint(offset, sha256)`, so a recorded checkpoint is always on
disk. A writer may start at a verified offset of an interrupted download (`start`).

The producer side (`space`, `filled`, `flush`, `restart`, `finish`, `abort`) is
called from one thread, the receiving one; none of it touches asyncio.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from typing import Callable

from ..direct_io import DirectFile, align_up
from .resume import ResumePoint

MAX_BUFFER = 8 << 20   # larger buffers gain nothing and cost memory
MIN_BUFFER = 64 << 10
BUFFERS = 3            # one receiving, one hashing, one being written

_STOP = None           # sentinel on the queues


class WriteFailed(Exception):
    """Writing the file failed (a full disk, an I/O error): never a dropped connection."""


def buffer_size_for(chunk_size: int) -> int:
    """`export.chunk_size` clamped to [MIN_BUFFER, MAX_BUFFER] and rounded up to the alignment."""
    return align_up(min(max(chunk_size, MIN_BUFFER), MAX_BUFFER))


class HashingDiskWriter:
    """See the module docstring. `on_written(n)` is called on the writer thread after
    each write lands (so the file's size on disk has grown by n)."""

    def __init__(self, out: DirectFile, chunk_size: int, on_written: Callable[[int], None],
                 start: ResumePoint | None = None, checkpoint_every: int = 0,
                 on_checkpoint: Callable[[int, str], None] = lambda *_: None) -> None:
        self._out = out
        self._on_written = on_written
        self._checkpoint_every = checkpoint_every
        self._on_checkpoint = on_checkpoint
        start = start or ResumePoint.start()
        size = buffer_size_for(chunk_size)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, size))  # anonymous mmaps are page-aligned
        self._to_hash: queue.Queue = queue.Queue()
        self._to_write: queue.Queue = queue.Queue()
        self._hash = start.hasher
        self._error: BaseException | None = None
        self._current = self._free.get()
        self._fill = 0          # bytes in the current buffer
        self._dispatched = start.offset  # bytes handed on: the current buffer's file offset
        self._last_mark = start.offset   # the hashing thread's last checkpoint
        self._threads = [threading.Thread(target=self._hash_loop, name="download-hash",
                                          daemon=True),
                         threading.Thread(target=self._write_loop, name="download-write",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def received(self) -> int:
        """Bytes taken so far (on disk, in flight, or in the current buffer)."""
        return self._dispatched + self._fill

    def space(self) -> memoryview:
        """Where the next received bytes go; call `filled(n)` after putting n there."""
        return memoryview(self._current)[self._fill:]

    def filled(self, nbytes: int) -> None:
        self._fill += nbytes
        if self._fill == len(self._current):
            self._dispatch()

    def flush(self) -> None:
        """Hand the partly filled buffer on (the end of the stream)."""
        if self._fill:
            self._dispatch()

    def _dispatch(self) -> None:
        self._raise_if_failed()
        self._to_hash.put((self._current, self._fill, self._dispatched))
        self._dispatched += self._fill
        self._current, self._fill = self._free.get(), 0
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriteFailed(f"{self._error.strerror or self._error}"
                              if isinstance(self._error, OSError) else str(self._error))

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not _STOP:
            buffer, nbytes, offset = item
            mark = None
            if self._error is None:
                with memoryview(buffer) as view:
                    self._hash.update(view[:nbytes])
                mark = self._mark(offset + nbytes)
            self._to_write.put((buffer, nbytes, offset, mark))
            self._to_hash.task_done()
        self._to_write.put(_STOP)
        self._to_hash.task_done()

    def _mark(self, end: int) -> str | None:
        """The hash of [0, end) when a checkpoint is due there (on the hashing thread)."""
        if not self._checkpoint_every or end - self._last_mark < self._checkpoint_every:
            return None
        self._last_mark = end
        return self._hash.copy().hexdigest()

    def _write_loop(self) -> None:
        while (item := self._to_write.get()) is not _STOP:
            buffer, nbytes, offset, mark = item
            try:
                if self._error is None:
                    self._write(buffer, nbytes, offset)
                    self._on_written(nbytes)
                    if mark is not None:
                        os.fdatasync(self._out.fd)
                        self._on_checkpoint(offset + nbytes, mark)
            except BaseException as exc:  # handed to the producer by _raise_if_failed
                self._error = exc
            finally:
                self._free.put(buffer)
                self._to_write.task_done()
        self._to_write.task_done()

    def _write(self, buffer: mmap.mmap, nbytes: int, offset: int) -> None:
        with memoryview(buffer) as view:
            self._out.pwrite(view[:nbytes], offset)

    def _wait_idle(self) -> None:
        self._to_hash.join()
        self._to_write.join()

    def restart(self) -> int:
        """Forget everything taken so far (the server ignored a Range request);
        returns how many bytes had been written."""
        self._wait_idle()
        self._raise_if_failed()
        os.ftruncate(self._out.fd, 0)
        written = self._dispatched  # all of it: the threads are idle and nothing failed
        self._hash = hashlib.sha256()
        self._fill = self._dispatched = self._last_mark = 0
        return written

    def finish(self) -> str:
        """Write what is left, fsync, stop the threads; the SHA-256 of everything."""
        self.flush()
        self._stop_threads()
        self._raise_if_failed()
        os.fsync(self._out.fd)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop the threads (after their current buffer); the file is the caller's to remove."""
        self._stop_threads()

    def _stop_threads(self) -> None:
        if self._threads:
            self._to_hash.put(_STOP)
            for thread in self._threads:
                thread.join()
            self._threads = []
