"""Sequential reading of a file, possibly still growing, read ahead past the page cache.

The streamOptimized decoder (streamopt.py) walks its source front to back. A
thread of this module reads ahead in CHUNK pieces with O_DIRECT where the
filesystem allows it, so the decoder never waits for the disk between chunks
(synchronous reads left its inflate threads idle) and reading costs no page
allocation: a download the decoder follows writes past the page cache, and
reading it back through the cache cost about 1 CPU-s per GiB on the test machine,
as much as inflating it. Chunks are copied into one reused working buffer, so
`buf` stays valid only until the next `ensure`: a caller copies what it keeps.

A growing file (a download under way, see `GrowingFile`) is followed: the
read-ahead hands on whatever has arrived and waits for more. Direct reads must
start on a page, so a file that ends mid-page for now has that page read again
once it grows.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Protocol

from ..direct_io import DIRECT_IO_ALIGNMENT, open_direct
from ..errors import Cancelled

CHUNK = 4 << 20
CHUNKS = 4            # read ahead up to this many chunks
_POLL = 0.2           # seconds between checks of `stop` while waiting for a chunk


class Growing(Protocol):
    def wait_beyond(self, offset: int, stop: threading.Event | None) -> bool: ...


class StreamReader:
    """`buf[pos:]` is the unread data at file offset `offset`; `ensure(n)` makes n
    bytes available there. Close it (it owns a thread and a descriptor)."""

    def __init__(self, path: Path, start: int, growing: Growing | None,
                 stop: threading.Event | None) -> None:
        self._fd, _direct = open_direct(path, os.O_RDONLY | os.O_CLOEXEC)
        self._growing = growing
        self._stop = stop
        self._halt = threading.Event()   # close(): the read-ahead thread ends
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._chunks = [mmap.mmap(-1, CHUNK) for _ in range(CHUNKS)]  # page-aligned
        for chunk in self._chunks:
            self._free.put(chunk)
        self._work = bytearray(2 * CHUNK)  # reused: fresh memory costs page faults
        self._have = 0                     # valid bytes in _work
        first = start - start % DIRECT_IO_ALIGNMENT
        self.base = first                # file offset of buf[0]
        self.pos = start - first         # position inside buf
        self.buf = memoryview(self._work)[:0]
        self._ended = False
        self._thread = threading.Thread(target=self._read_ahead, args=(first,),
                                        name="stream-read", daemon=True)
        self._thread.start()

    @property
    def offset(self) -> int:
        return self.base + self.pos

    @property
    def exhausted(self) -> bool:
        """Nothing left unread in the buffer (check after a failed `ensure`)."""
        return self.pos >= len(self.buf)

    def ensure(self, n: int) -> bool:
        """Make n bytes available at pos; False when the file ends first."""
        if len(self.buf) - self.pos >= n:
            return True
        keep_from = min(self.pos, len(self.buf))  # pos can lie ahead of what was read
        rest = len(self.buf) - keep_from
        self.buf.release()
        with memoryview(self._work) as work:
            work[:rest] = work[keep_from:keep_from + rest]
        self._have = rest
        self.base += keep_from
        self.pos -= keep_from
        while self._have < self.pos + n and not self._ended:
            self._append_next_chunk()
        self.buf = memoryview(self._work)[:self._have]
        return self._have >= self.pos + n

    def skip(self, n: int) -> bool:
        if not self.ensure(n):
            return False
        self.pos += n
        return True

    def _append_next_chunk(self) -> None:
        while True:
            try:
                item = self._ready.get(timeout=_POLL)
                break
            except queue.Empty:
                if self._stop is not None and self._stop.is_set():
                    raise Cancelled("decoding cancelled") from None
        if item is None:
            self._ended = True
        elif isinstance(item, BaseException):
            self._ended = True
            raise item
        else:
            chunk, nbytes = item
            if self._have + nbytes > len(self._work):  # only for a request beyond 2 chunks
                self._work.extend(bytes(self._have + nbytes - len(self._work)))
            with memoryview(chunk) as source, memoryview(self._work) as work:
                work[self._have:self._have + nbytes] = source[:nbytes]
            self._have += nbytes
            self._free.put(chunk)

    def _read_ahead(self, offset: int) -> None:
        try:
            while (chunk := self._free.get()) is not None and not self._halt.is_set():
                nbytes = self._fill(chunk, offset)
                if nbytes is None:
                    break
                self._ready.put((chunk, nbytes))
                offset += nbytes
                if nbytes % DIRECT_IO_ALIGNMENT:
                    break  # only the true end is handed on mid-page
        except Cancelled:
            pass  # halted while waiting for the file to grow
        except BaseException as exc:  # handed to the decoder, which reports it
            self._ready.put(exc)
            return
        self._ready.put(None)

    def _fill(self, chunk: mmap.mmap, offset: int) -> int | None:
        """Read what there is at `offset` (aligned) into `chunk`, waiting for a
        growing file; the byte count, or None at the end of the file. A page the
        file ends in is handed on only at the true end (direct reads must start
        on a page, so one still growing is read again later)."""
        with memoryview(chunk) as view:
            got = 0
            while got < len(chunk):
                count = os.preadv(self._fd, [view[got:]], offset + got)
                partial = count % DIRECT_IO_ALIGNMENT
                got += count - partial
                if count and not partial:
                    continue
                if got:
                    return got  # hand on the whole pages there are; a partial one later
                if not self._wait(offset + partial):
                    return partial or None  # the true end (mid-page, or none left)
            return got

    def _wait(self, size: int) -> bool:
        """For a growing file: wait until it is longer than `size` (False: it ended)."""
        return self._growing is not None and self._growing.wait_beyond(size, self._halt)

    def close(self) -> None:
        """Stop the read-ahead thread, close the file, free the buffers."""
        self._halt.set()
        self._free.put(None)
        self._thread.join()
        self.buf.release()
        os.close(self._fd)
        for chunk in self._chunks:
            chunk.close()
