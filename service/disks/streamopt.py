"""A streaming decoder for streamOptimized VMDK files, inflating on every core.

A streamOptimized VMDK is a sequence of markers after its header: each grain
marker (LBA, compressed size, deflate data padded to a sector) carries one
compressed grain; metadata markers (grain table, grain directory, footer) carry
tables we do not need, and an all-zero end-of-stream marker ends it (VMware
writes one; qemu, which keeps its tables at the front, just ends the file).

qemu-img inflates grains on one thread. Here one thread parses markers
sequentially and a small pool inflates grains (ISA-L's inflate from the `isal`
package, ~2.4x zlib's speed; both release the GIL) and writes them at their
offset, either into a raw file or straight into a qcow2 image (`qcow2write.py`).
All-zero grains and missing grains stay holes, so the output is sparse. The
queue of grains in flight is bounded, so memory does not grow with the disk.
A stream that ends inside a grain or a marker is an error.
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..direct_io import DirectFile
from ..errors import Cancelled, Failed
from .qcow2write import Qcow2Writer
from .stream_reader import StreamReader
from .vmdk import (GD_AT_END, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
                   SparseHeader, grain_tables_complete, read_sparse_header)

try:  # ISA-L inflates ~2.4x faster than zlib here and also releases the GIL
    from isal import isal_zlib as inflater
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps it working
    inflater = zlib

BATCH_GRAINS = 16   # grains per task for the inflate threads
MAX_IN_FLIGHT = 6   # batches queued or being inflated: bounds memory
PROGRESS_EVERY = 32 << 20
_MARKER = struct.Struct("<QII")


class GrowingFile:
    """How far a file that is still being written (a download) has got.

    The writer calls `grew(size)` as bytes land and `finish()` when it stops, in
    any thread; the decoder blocks in `wait_beyond` instead of treating the end
    of what is there so far as the end of the stream.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._size = 0
        self._finished = False

    def grew(self, size: int) -> None:
        with self._cond:
            self._size = max(self._size, size)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def wait_beyond(self, offset: int, stop: threading.Event | None) -> bool:
        """Block until the file is longer than `offset` (True) or finished (False)."""
        with self._cond:
            while self._size <= offset and not self._finished:
                if stop is not None and stop.is_set():
                    raise Cancelled("decoding cancelled")
                self._cond.wait(0.2)
            return self._size > offset


def _round_up(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR


StoreFn = Callable[[list[tuple[int, bytes]]], None]


def raw_store(out: DirectFile) -> StoreFn:
    """Write (offset, data) pieces into a raw file, one write per contiguous run."""
    def store(pieces: list[tuple[int, bytes]]) -> None:
        run: list[bytes] = []
        start = end = 0
        for offset, data in pieces:
            if run and offset != end:
                out.pwrite_pieces(run, start)
                run = []
            if not run:
                start = offset
            run.append(data)
            end = offset + len(data)
        out.pwrite_pieces(run, start)
    return store


class _GrainWriter:
    """Inflates grains in batches on a thread pool and stores the non-zero ones.

    Batches keep per-grain Python work, thread hand-offs and write calls few.
    """

    def __init__(self, path: Path, store: StoreFn, grain_bytes: int, capacity: int,
                 workers: int) -> None:
        self._path = path
        self._store = store
        self._grain_bytes = grain_bytes
        self._capacity = capacity
        self._zero = bytes(grain_bytes)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamopt")
        self._pending: deque[Future] = deque()
        self._batch: list[tuple[int, bytes]] = []

    def submit(self, lba: int, data: bytes) -> None:
        self._batch.append((lba, data))
        if len(self._batch) >= BATCH_GRAINS:
            self._submit_batch()

    def _submit_batch(self) -> None:
        if len(self._pending) >= MAX_IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._inflate_batch, self._batch))
        self._batch = []

    def _inflate_batch(self, batch: list[tuple[int, bytes]]) -> None:
        pieces = []
        for lba, data in batch:
            out = self._inflate(lba, data)
            if out != self._zero[:len(out)]:
                pieces.append((lba * SECTOR, out))
        if pieces:
            self._store(pieces)

    def _inflate(self, lba: int, data: bytes) -> bytes:
        expected = min(self._grain_bytes, self._capacity - lba * SECTOR)
        try:
            out = inflater.decompress(data, bufsize=self._grain_bytes)
        except inflater.error as exc:
            raise Failed(f"{self._path}: grain at sector {lba} does not inflate: {exc}") from None
        if len(out) < expected or len(out) > self._grain_bytes:
            raise Failed(f"{self._path}: grain at sector {lba} inflates to {len(out)} bytes, "
                         f"expected {expected}")
        return out[:expected] if len(out) > expected else out

    def finish(self) -> None:
        if self._batch:
            self._submit_batch()
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def abort(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)


def decode(source: Path, target: Path, *, out_format: str = "raw", workers: int = 2,
           on_progress: Callable[[int, int], None] | None = None,
           stop: threading.Event | None = None, growing: GrowingFile | None = None) -> int:
    """Decode a streamOptimized VMDK into a sparse raw or qcow2 file; return its size.

    Blocking: run it in a thread. `on_progress(bytes_done, capacity)` follows the
    LBA of the grains; setting `stop` makes it raise Cancelled soon after. With
    `growing`, the source is still being written and the decoder keeps pace with
    it. The caller owns `target`: it fsyncs it when it keeps it and removes it on
    failure.
    """
    if out_format not in ("raw", "qcow2"):
        raise ValueError(f"out_format must be raw or qcow2, not {out_format!r}")
    source = Path(source)
    with open(source, "rb", buffering=0) as fh:
        header = read_header(source, fh, growing, stop)
        capacity = header.capacity_sectors * SECTOR
        grain_bytes = header.grain_sectors * SECTOR
        out = DirectFile(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if out_format == "qcow2":
                image = Qcow2Writer(out, capacity, grain_bytes)
                store, close = image.write_clusters, image.close
            else:
                os.ftruncate(out.fd, capacity)
                store, close = raw_store(out), None
            writer = _GrainWriter(source, store, grain_bytes, capacity, workers)
            reader = StreamReader(source, header.overhead_sectors * SECTOR, growing, stop)
            try:
                _walk_markers(source, reader, writer, header, on_progress, stop)
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            finally:
                reader.close()
            _check_tables(source, fh, header)
            if close:
                close()
        finally:
            out.close()
    return capacity


def read_header(source: Path, fh, growing: GrowingFile | None = None,
                stop: threading.Event | None = None) -> SparseHeader:
    """The streamOptimized header at the start of `fh` (waiting for it if growing)."""
    if growing is not None:
        growing.wait_beyond(SECTOR - 1, stop)
    fh.seek(0)
    size = None if growing is not None else os.fstat(fh.fileno()).st_size
    header = read_sparse_header(source, fh.read(SECTOR), size)
    if not header.stream_optimized:
        raise Failed(f"{source}: not a streamOptimized VMDK (no compressed grains with markers)")
    return header


def _check_tables(source: Path, fh, header: SparseHeader) -> None:
    """A qemu-style stream has no end marker: its up-front grain tables must fit the file."""
    if header.gd_offset != GD_AT_END and not grain_tables_complete(
            fh, header, os.fstat(fh.fileno()).st_size):
        raise Failed(f"{source}: truncated: its grain tables point past the end of the file")


def _walk_markers(source: Path, reader: StreamReader, writer: _GrainWriter, header: SparseHeader,
                  on_progress, stop) -> None:
    capacity_sectors = header.capacity_sectors
    max_compressed = header.grain_sectors * SECTOR * 2 + 1024
    seen = bytearray(capacity_sectors // header.grain_sectors // 8 + 1)  # one bit per grain
    capacity = capacity_sectors * SECTOR
    next_report, done = PROGRESS_EVERY, 0
    while True:
        if not reader.ensure(_MARKER.size):
            if reader.exhausted and header.gd_offset != GD_AT_END:
                return  # qemu ends its streams without an EOS marker (tables are up front)
            raise Failed(f"{source}: truncated at byte {reader.offset}: the stream ends "
                         f"without its end-of-stream marker")
        val, size, kind = _MARKER.unpack_from(reader.buf, reader.pos)
        if size:
            if val >= capacity_sectors or val % header.grain_sectors:
                raise Failed(f"{source}: grain marker at byte {reader.offset} has LBA {val}, "
                             f"outside the disk or not grain-aligned")
            if size > max_compressed:
                raise Failed(f"{source}: grain marker at byte {reader.offset} claims {size} "
                             f"compressed bytes, more than a grain can need")
            grain, bit = divmod(val // header.grain_sectors, 8)
            if seen[grain] & (1 << bit):
                raise Failed(f"{source}: a second grain for sector {val} at byte {reader.offset}")
            seen[grain] |= 1 << bit
            total = _round_up(12 + size)
            if not reader.ensure(total):
                raise Failed(f"{source}: truncated inside the grain at byte {reader.offset}: "
                             f"the stream ends without its end-of-stream marker")
            start = reader.pos + 12
            writer.submit(val, bytes(reader.buf[start:start + size]))  # buf is reused
            reader.pos += total
            done = min(capacity, (val + header.grain_sectors) * SECTOR)
        elif kind == MARKER_EOS:
            return
        elif kind in (MARKER_GT, MARKER_GD, MARKER_FOOTER):
            extra = SECTOR if kind == MARKER_FOOTER else val * SECTOR
            if not reader.skip(SECTOR + extra):
                raise Failed(f"{source}: truncated inside a metadata marker at byte "
                             f"{reader.offset}")
        else:
            raise Failed(f"{source}: unknown marker type {kind} at byte {reader.offset}")
        if reader.offset >= next_report:
            if stop is not None and stop.is_set():
                raise Cancelled(f"{source}: decoding cancelled")
            if on_progress:
                on_progress(done, capacity)
            next_report = reader.offset + PROGRESS_EVERY

