"""One streamed HTTP download to a file: hashed while written, resumed, checked, atomic.

Every provider that pulls a disk over HTTP (vSphere datastore files and NFC lease
URLs, cloud blob URLs) uses `download`. The body never sits in memory: received
pieces are gathered up to about `chunk_size`, then hashed and written in a worker
thread while the next batch is being received. A dropped connection is
resumed with an HTTP `Range` request from the first byte not yet received, up to
`max_retries` times. The file appears under its final name only when complete
and of the expected size; on failure or cancellation the temporary file is removed.

Throughput (bench/export.py): every batch written is passed to
`posix_fadvise(DONTNEED)`, which starts its writeback while the download runs, so
the final fsync finds little left to write (it used to take a fifth to a third of
the download time). Pages more than CACHE_WINDOW behind the writer are dropped from
the page cache the same way, so a multi-GiB download does not flood it while a
reader that follows the download (pipeline/overlap.py) still finds recent data cached.
Responses are read with a 1 MiB buffer: with aiohttp's default of 64 KiB the socket
is paused and resumed every 128 KiB whenever the writer is behind, which cost
about 10% more CPU; much larger buffers cost more again (they fall out of cache).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..errors import Failed, NotFound

Log = Callable[..., None]

_READ_BUFSIZE = 1 << 20
CACHE_WINDOW = 64 << 20
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_DROPPED = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError,
            ConnectionError)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str


def redact_url(url: str) -> str:
    """The URL without query or credentials: signed URLs carry secrets in the query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def file_sha256(path: Path, block: int = 4 << 20) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in blocks (blocking)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def temp_path_for(target: Path) -> Path:
    """A hidden temporary name next to `target`, so the final rename stays on one filesystem."""
    return target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")


class _HashingWriter:
    """Hashes and writes buffers in a worker thread, one buffer in flight at a time."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._pending: asyncio.Future | None = None
        self.size = 0
        self._dropped = 0  # the file's pages before this offset have left the page cache

    def _write(self, pieces: list[bytes]) -> None:
        batch = self._handle.tell()
        for piece in pieces:
            self._hash.update(piece)
            self._handle.write(piece)
        self._handle.flush()
        end = self._handle.tell()
        self._advise_dontneed(batch, end)  # dirty pages: this only starts their writeback
        if end - CACHE_WINDOW > self._dropped:
            self._advise_dontneed(self._dropped, end - CACHE_WINDOW)  # written back by now
            self._dropped = end - CACHE_WINDOW

    def _advise_dontneed(self, start: int, end: int) -> None:
        try:
            os.posix_fadvise(self._handle.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:  # only advice: a filesystem that refuses it loses nothing
            pass

    async def submit(self, pieces: list[bytes], nbytes: int) -> None:
        """Queue `pieces` (in order) behind the write in flight; no joining, no copies."""
        await self.drain()
        self.size += nbytes
        self._pending = asyncio.ensure_future(asyncio.to_thread(self._write, pieces))

    async def drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def restart(self) -> None:
        """Forget everything written (the server ignored a Range request)."""
        await self.drain()
        await asyncio.to_thread(self._truncate)
        self._hash = hashlib.sha256()
        self.size = 0

    def _truncate(self) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._dropped = 0

    async def finish(self) -> str:
        await self.drain()
        await asyncio.to_thread(self._sync)
        return self._hash.hexdigest()

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        # every page is clean now, so this drop takes effect even where writeback had
        # not caught up when the earlier advice was given (a busy machine)
        keep_from = max(0, self._handle.tell() - CACHE_WINDOW)
        if keep_from:
            self._advise_dontneed(0, keep_from)

    async def abandon(self) -> None:
        """Wait for a write still running in its thread, so the file can be closed safely."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                await asyncio.shield(pending)
            except BaseException:  # the original failure is what matters
                pass


def _check_status(response: aiohttp.ClientResponse, shown: str, offset: int) -> None:
    status = response.status
    if status == 404:
        raise NotFound(f"download {shown}: the server has no such file (HTTP 404)")
    if status in (401, 403):
        raise Failed(f"download {shown}: access refused by the server (HTTP {status})")
    if status == 416:
        raise Failed(f"download {shown}: the file on the server ends before byte {offset}, "
                     f"shorter than expected (HTTP 416)")
    if status not in (200, 206):
        raise aiohttp.ClientResponseError(response.request_info, response.history,
                                          status=status, message=response.reason or "")


def _resume_offset(response: aiohttp.ClientResponse, offset: int, shown: str) -> int:
    """Where the body of this response starts: `offset` for a 206, 0 for a full 200."""
    if response.status == 200:
        return 0
    match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        raise Failed(f"download {shown}: the server answered a resume at byte {offset} "
                     f"with Content-Range {response.headers.get('Content-Range')!r}")
    return offset


async def _receive(response: aiohttp.ClientResponse, writer: _HashingWriter, chunk_size: int,
                   on_bytes: Callable[[int], None]) -> None:
    pieces: list[bytes] = []
    gathered = 0
    try:
        async for piece in response.content.iter_any():
            pieces.append(piece)
            gathered += len(piece)
            if gathered >= chunk_size:
                await writer.submit(pieces, gathered)
                on_bytes(gathered)
                pieces, gathered = [], 0
    finally:
        # bytes received before a drop are good: keep them so the resume starts after them
        if gathered:
            await writer.submit(pieces, gathered)
            on_bytes(gathered)


async def _fetch_into(session: aiohttp.ClientSession, url: str, writer: _HashingWriter, *,
                      shown: str, expected_size: int | None, chunk_size: int, max_retries: int,
                      on_bytes: Callable[[int], None], log: Log, headers: dict | None,
                      ssl, read_timeout: float) -> None:
    drops = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=read_timeout, sock_read=read_timeout)
    while True:
        offset = writer.size
        request_headers = dict(headers or {})
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        try:
            async with session.get(url, headers=request_headers, ssl=ssl, timeout=timeout,
                                   read_bufsize=_READ_BUFSIZE) as response:
                _check_status(response, shown, offset)
                if offset and _resume_offset(response, offset, shown) == 0:
                    log(f"download {shown}: the server ignored the Range request; "
                        f"starting again from byte 0")
                    on_bytes(-offset)
                    await writer.restart()
                await _receive(response, writer, chunk_size, on_bytes)
                if expected_size is not None and writer.size < expected_size:
                    raise aiohttp.ClientPayloadError("the connection closed early")
            return
        except (*_DROPPED, aiohttp.ClientResponseError) as exc:
            drops += 1
            cause = _describe(exc)
            if drops > max_retries:
                raise Failed(f"download {shown} failed after {drops} attempts "
                             f"(export.max_retries is {max_retries}): {cause}") from None
            log(f"download {shown}: connection lost at byte {writer.size} ({cause}); "
                f"retry {drops}/{max_retries}", "warning")
            await asyncio.sleep(min(0.2 * 2 ** (drops - 1), 5.0))
            log(f"download {shown}: resumed at byte {writer.size}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".strip()
    if isinstance(exc, asyncio.TimeoutError):
        return "no data within the read timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def download(session: aiohttp.ClientSession, url: str, target: Path, *,
                   expected_size: int | None, chunk_size: int, max_retries: int,
                   on_bytes: Callable[[int], None], log: Log, headers: dict | None = None,
                   ssl=None, read_timeout: float = 60.0,
                   shown: str | None = None,
                   on_temp: Callable[[Path], None] | None = None) -> DownloadResult:
    """Download `url` to `target`; see the module docstring for the guarantees.

    `log(message)` or `log(message, level)` receives progress lines (URLs without
    their query). `on_bytes(n)` is called as data is written (n < 0 if a server
    that ignores Range forced a restart). Raises Failed or NotFound with a message
    naming the file; the temporary file is gone afterwards.
    """
    target = Path(target)
    shown = shown or redact_url(url)  # callers whose URL path is a secret name it themselves
    temp = temp_path_for(target)
    handle = await asyncio.to_thread(open, temp, "wb")
    if on_temp is not None:  # a reader that follows the download (pipeline/overlap.py)
        on_temp(temp)
    writer = _HashingWriter(handle)
    try:
        await _fetch_into(session, url, writer, shown=shown, expected_size=expected_size,
                          chunk_size=chunk_size,
                          max_retries=max_retries, on_bytes=on_bytes, log=log,
                          headers=headers, ssl=ssl, read_timeout=read_timeout)
        digest = await writer.finish()
        if expected_size is not None and writer.size != expected_size:
            raise Failed(f"download {shown}: received {writer.size} bytes, expected "
                         f"{expected_size}")
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, temp, target)
        return DownloadResult(target, writer.size, digest)
    except BaseException:
        await writer.abandon()
        handle.close()
        temp.unlink(missing_ok=True)
        raise
