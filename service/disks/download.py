"""One streamed HTTP download to a file: hashed while written, resumed, checked, atomic.

Every provider that pulls a disk over HTTP (vSphere datastore files and NFC lease
URLs, cloud blob URLs) uses `download`. The body never sits in memory: it is read
straight into the buffers of a `disk_writer.HashingDiskWriter`, which hashes and
writes them on two threads of its own while the next one fills. A dropped
connection is resumed with an HTTP `Range` request from the first byte not yet
received, up to `max_retries` times. The file appears under its final name only
when complete and of the expected size; on failure or cancellation the temporary
file is removed.

The transfer runs in a thread of its own with the standard library's blocking
HTTP client, which reads the body with `readinto` into the writer's buffer, no
copy beyond the kernel's. Through aiohttp the same body cost about 0.5 CPU-s per
GiB more (its parser copies every piece, then the pieces were copied into the
buffer), which on a 2-core machine was the difference between keeping up with
`curl` or not (bench/export.py). Redirects are followed (at most 5; the Cookie and
Authorization headers are not sent to another host). Cancelling the awaiting task
shuts the socket down, so the thread ends within moments, and is waited for.
"""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import socket
import ssl as ssl_module
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import SplitResult, quote, urljoin, urlsplit, urlunsplit

from ..errors import Cancelled, Failed, NotFound
from ..redact import redact_url
from ..direct_io import DirectFile
from ..files import temp_path_for
from .disk_writer import HashingDiskWriter, WriteFailed
from .threads import run_in_own_thread

Log = Callable[..., None]

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_PRIVATE_HEADERS = ("cookie", "authorization")


class _Dropped(Exception):
    """The connection failed or ended early: worth a resume."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str


def file_sha256(path: Path, block: int = 4 << 20,
                stop: threading.Event | None = None) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in blocks (blocking); `stop` ends it early."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            if stop is not None and stop.is_set():
                raise Cancelled(f"checksumming {path.name} cancelled")
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


class _Transfer:
    """The blocking side of one download: requests, retries, the body into the writer.

    `log` and `on_bytes` must be safe to call from any thread (download() hands in
    wrappers that post to the event loop).
    """

    def __init__(self, url: str, writer: HashingDiskWriter, *, shown: str,
                 expected_size: int | None, max_retries: int, log: Log,
                 on_restart: Callable[[int], None], headers: dict | None,
                 ssl: ssl_module.SSLContext | None, read_timeout: float) -> None:
        self.url, self.writer, self.shown = url, writer, shown
        self.expected_size, self.max_retries = expected_size, max_retries
        self.log, self.on_restart = log, on_restart
        self.headers = dict(headers or {})
        self.ssl, self.read_timeout = ssl, read_timeout
        self._stopped = threading.Event()
        self._connection: http.client.HTTPConnection | None = None

    def stop(self) -> None:
        """From another thread: end the transfer now (a blocked read returns at once)."""
        self._stopped.set()
        connection = self._connection
        if connection is not None and connection.sock is not None:
            try:  # the plain socket's shutdown, also under TLS: it only wakes the reader
                socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        drops = 0
        while True:
            try:
                self._attempt()
                return
            except _Dropped as exc:
                if self._stopped.is_set():
                    raise Failed(f"download {self.shown}: stopped") from None
                drops += 1
                if drops > self.max_retries:
                    raise Failed(f"download {self.shown} failed after {drops} attempts "
                                 f"(export.max_retries is {self.max_retries}): {exc}") from None
                self.log(f"download {self.shown}: connection lost at byte "
                         f"{self.writer.received} ({exc}); retry {drops}/{self.max_retries}",
                         "warning")
                if self._stopped.wait(min(0.2 * 2 ** (drops - 1), 5.0)):
                    raise Failed(f"download {self.shown}: stopped") from None
                self.log(f"download {self.shown}: resumed at byte {self.writer.received}")
            finally:
                self._close()

    def _attempt(self) -> None:
        offset = self.writer.received
        try:
            response = self._request(offset)
            if offset and not _resumed(response, offset, self.shown):
                self.log(f"download {self.shown}: the server ignored the Range request; "
                         f"starting again from byte 0")
                self.on_restart(self.writer.restart())
            self._receive(response)
        except ssl_module.SSLCertVerificationError as exc:
            raise Failed(f"download {self.shown}: the server's certificate is not trusted "
                         f"({exc.verify_message})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Dropped(_describe(exc)) from None

    def _request(self, offset: int) -> http.client.HTTPResponse:
        """GET from `offset`, following redirects; the response of a 200 or 206."""
        url, headers = self.url, dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, headers)
            location = response.getheader("Location")
            if response.status not in _REDIRECTS or not location:
                _check_status(response.status, response.reason, self.shown, offset)
                return response
            next_url = urljoin(url, location)
            if urlsplit(next_url).netloc != urlsplit(url).netloc:
                headers = {k: v for k, v in headers.items() if k.lower() not in _PRIVATE_HEADERS}
            url = next_url
            self._close()
        raise Failed(f"download {self.shown}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, headers: dict) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        connection = self._connection = self._connection_for(parts)
        connection.connect()
        if self._stopped.is_set():  # a stop() while connecting found no socket to shut
            raise _Dropped("stopped")
        # http.client sends the target as it is: escape what is not ASCII, keep escapes
        target = quote(urlunsplit(("", "", parts.path or "/", parts.query, "")),
                       safe="/%:@!$&'()*+,;=?")
        connection.request("GET", target, headers=headers)
        return connection.getresponse()

    def _connection_for(self, parts: SplitResult) -> http.client.HTTPConnection:
        try:  # the port is always given: http.client would misparse a host like "::1"
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise Failed(f"download {self.shown}: not a usable http(s) URL")
        if parts.scheme == "http":
            return http.client.HTTPConnection(parts.hostname, port, timeout=self.read_timeout)
        return http.client.HTTPSConnection(
            parts.hostname, port, timeout=self.read_timeout,
            context=self.ssl or ssl_module.create_default_context())

    def _receive(self, response: http.client.HTTPResponse) -> None:
        writer = self.writer
        while True:
            space = writer.space()
            try:
                nbytes = response.readinto(space)
            finally:
                space.release()
            if not nbytes:
                break
            writer.filled(nbytes)
        if self._stopped.is_set():
            raise _Dropped("stopped")
        if response.length or (self.expected_size is not None
                               and writer.received < self.expected_size):
            raise _Dropped("the connection closed early")

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _check_status(status: int, reason: str, shown: str, offset: int) -> None:
    if status == 404:
        raise NotFound(f"download {shown}: the server has no such file (HTTP 404)")
    if status in (401, 403):
        raise Failed(f"download {shown}: access refused by the server (HTTP {status})")
    if status == 416:
        raise Failed(f"download {shown}: the file on the server ends before byte {offset}, "
                     f"shorter than expected (HTTP 416)")
    if status not in (200, 206):
        raise _Dropped(f"HTTP {status} {reason}".strip())


def _resumed(response: http.client.HTTPResponse, offset: int, shown: str) -> bool:
    """Whether the body continues at `offset` (a 206) rather than starting over (a 200)."""
    if response.status == 200:
        return False
    content_range = response.getheader("Content-Range", "")
    match = _CONTENT_RANGE_RE.match(content_range)
    if not match or int(match.group(1)) != offset:
        raise Failed(f"download {shown}: the server answered a resume at byte {offset} "
                     f"with Content-Range {content_range!r}")
    return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no data within the read timeout"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed early"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def download(url: str, target: Path, *, expected_size: int | None, chunk_size: int,
                   max_retries: int, on_bytes: Callable[[int], None], log: Log,
                   headers: dict | None = None, ssl: ssl_module.SSLContext | None = None,
                   read_timeout: float = 60.0, shown: str | None = None,
                   on_temp: Callable[[Path], None] | None = None) -> DownloadResult:
    """Download `url` to `target`; see the module docstring for the guarantees.

    `log(message)` or `log(message, level)` receives progress lines (URLs redacted by
    redact_url). `on_bytes(n)` is called as data lands in the file (n < 0 if a
    server that ignores Range forced a restart). `ssl` verifies https (None: the
    system's trust store). Raises Failed or NotFound with a message naming the file;
    the temporary file is gone afterwards.
    """
    target = Path(target)
    shown = shown or redact_url(url)  # callers whose URL path is a secret name it themselves
    temp = temp_path_for(target)
    loop = asyncio.get_running_loop()

    def post(fn: Callable[..., None]) -> Callable[..., None]:
        return lambda *args: loop.call_soon_threadsafe(fn, *args)

    out = await asyncio.to_thread(DirectFile, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                  0o666)
    try:
        if on_temp is not None:  # a reader that follows the download (jobs/overlap.py)
            on_temp(temp)
        writer = HashingDiskWriter(out, chunk_size, post(on_bytes))
        transfer = _Transfer(url, writer, shown=shown, expected_size=expected_size,
                             max_retries=max_retries, log=post(log),
                             on_restart=lambda written: post(on_bytes)(-written),
                             headers=headers, ssl=ssl, read_timeout=read_timeout)

        def run() -> str:
            try:
                transfer.run()
                return writer.finish()
            except WriteFailed as exc:
                raise Failed(f"download {shown}: writing {target.name} failed: {exc}") from None
            finally:
                writer.abort()

        digest = await run_in_own_thread(run, transfer.stop, "download")
        if expected_size is not None and writer.received != expected_size:
            raise Failed(f"download {shown}: received {writer.received} bytes, expected "
                         f"{expected_size}")
        await asyncio.to_thread(os.replace, temp, target)
        return DownloadResult(target, writer.received, digest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        out.close()
