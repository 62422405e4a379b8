"""One streamed HTTP download to a file: hashed while written, resumed, checked, atomic.

Every provider that pulls a disk over HTTP (vSphere datastore files and NFC lease
URLs, cloud blob URLs) uses `download`. The body never sits in memory: it is read
straight into the buffers of a `disk_writer.HashingDiskWriter`, which hashes and
writes them on two threads of its own while the next one fills. A dropped
connection is resumed with an HTTP `Range` request from the first byte not yet
received, up to `max_retries` times. The file appears under its final name only
when complete and of the expected size; on failure or cancellation the temporary
file is removed — unless the download keeps checkpoints for a later resume
(`checkpoints`, resume.py): then the file stays for its job to keep or discard, and a
download of the same name in a later run re-checks it and continues after its last
verified checkpoint.

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
from ..model import Checkpoint, DownloadCheckpoints, SavedDownload
from ..redact import redact_url
from ..direct_io import DirectFile
from ..files import temp_path_for
from .disk_writer import HashingDiskWriter, WriteFailed
from .resume import ResumePoint, verify
from .threads import from_any_thread, run_in_own_thread

Log = Callable[..., None]

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE_RE = re.compile(r"^bytes \*/(\d+)$")
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
                 ssl: ssl_module.SSLContext | None, read_timeout: float,
                 validator: str = "") -> None:
        self.url, self.writer, self.shown = url, writer, shown
        self.validator = validator  # of the file being fetched (SavedDownload)
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
        while not self._have_all():
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

    def _have_all(self) -> bool:
        """A resumed download may have every byte already (it ended before its last
        checkpoint was recorded)."""
        return self.expected_size is not None and self.writer.received >= self.expected_size

    def _attempt(self) -> None:
        offset = self.writer.received
        try:
            response = self._request(offset)
            if response is None:
                return  # a resume at the end: nothing more to fetch
            if offset and not self._continues(response, offset):
                self.on_restart(self.writer.restart())
                if response.status == 206:  # the rest of another file: ask for all of it
                    self._close()
                    response = self._request(0)
            if response.status == 200:
                self.validator = _validator_of(response)
            self._receive(response)
        except ssl_module.SSLCertVerificationError as exc:
            raise Failed(f"download {self.shown}: the server's certificate is not trusted "
                         f"({exc.verify_message})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Dropped(_describe(exc)) from None

    def _continues(self, response: http.client.HTTPResponse, offset: int) -> bool:
        """Whether the response continues the file at `offset`; else say why not."""
        if not _resumed(response, offset, self.shown):
            self.log(f"download {self.shown}: the server sent the whole file again (it "
                     "ignores Range, or the file changed); starting again from byte 0",
                     "warning")
            return False
        current = _validator_of(response)
        if self.validator and current and current != self.validator:  # If-Range ignored
            self.log(f"download {self.shown}: the file on the server changed after byte "
                     f"{offset} was received; starting again from byte 0", "warning")
            return False
        return True

    def _request(self, offset: int) -> http.client.HTTPResponse | None:
        """GET from `offset`, following redirects; the response of a 200 or 206, or None
        when the file on the server, of a size not known beforehand, ends exactly at
        `offset` (a resume at its end)."""
        url, headers = self.url, dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator:  # the rest only if the file is the one begun; else all
                headers["If-Range"] = self.validator
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, headers)
            location = response.getheader("Location")
            if offset and self.expected_size is None and _ends_at(response, offset):
                return None
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


def _validator_of(response: http.client.HTTPResponse) -> str:
    """What identifies this version of the file for If-Range: a strong ETag, else the
    Last-Modified date ("" if the server gives neither)."""
    etag = response.getheader("ETag", "")
    if etag and not etag.startswith("W/"):
        return etag
    return response.getheader("Last-Modified", "")


def _ends_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """A 416 whose Content-Range says the file is `offset` bytes long."""
    match = _UNSATISFIED_RANGE_RE.match(response.getheader("Content-Range", ""))
    return response.status == 416 and match is not None and int(match.group(1)) == offset


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
                   on_temp: Callable[[Path], None] | None = None,
                   checkpoints: DownloadCheckpoints | None = None) -> DownloadResult:
    """Download `url` to `target`; see the module docstring for the guarantees.

    `log(message)` or `log(message, level)` receives progress lines (URLs redacted by
    redact_url). `on_bytes(n)` is called as data lands in the file (n < 0 if a
    server that ignores Range forced a restart). `ssl` verifies https (None: the
    system's trust store). Raises Failed or NotFound with a message naming the file;
    the temporary file is gone afterwards unless `checkpoints` keeps it for a resume.
    """
    target = Path(target)
    shown = shown or redact_url(url)  # callers whose URL path is a secret name it themselves
    temp, out, start, validator = await _open_output(target, checkpoints, shown, log)
    try:
        if on_temp is not None:  # a reader that follows the download (jobs/overlap.py)
            on_temp(temp)
        if start.offset:
            on_bytes(start.offset)
        if start.complete:
            out.close()
            return await _finish(temp, target, start.offset, start.hasher.hexdigest())
        saver = _CheckpointSaver(checkpoints, target.name, temp.name)

        def on_checkpoint(offset: int, sha256: str) -> None:
            saver.save(offset, sha256, transfer.validator)

        def on_restart(written: int) -> None:
            saver.clear()
            on_bytes(-written)

        writer = HashingDiskWriter(out, chunk_size, from_any_thread(on_bytes), start=start,
                                   checkpoint_every=saver.interval,
                                   on_checkpoint=from_any_thread(on_checkpoint))
        transfer = _Transfer(url, writer, shown=shown, expected_size=expected_size,
                             max_retries=max_retries, log=from_any_thread(log),
                             on_restart=from_any_thread(on_restart), headers=headers, ssl=ssl,
                             read_timeout=read_timeout, validator=validator)

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
        saver.save(writer.received, digest, transfer.validator, final=True)
        return await _finish(temp, target, writer.received, digest)
    except BaseException:
        if checkpoints is None:
            temp.unlink(missing_ok=True)
        raise
    finally:
        out.close()


class _CheckpointSaver:
    """Records one download's checkpoints (nothing without `checkpoints`)."""

    def __init__(self, checkpoints: DownloadCheckpoints | None, target_name: str,
                 temp_name: str) -> None:
        self.checkpoints, self.target_name, self.temp_name = checkpoints, target_name, temp_name
        self.interval = checkpoints.interval if checkpoints is not None else 0

    def save(self, offset: int, sha256: str, validator: str, final: bool = False) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.target_name, self.temp_name, validator,
                                  Checkpoint(offset, sha256, final))

    def clear(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.clear(self.target_name)


async def _finish(temp: Path, target: Path, size: int, digest: str) -> DownloadResult:
    if temp != target:
        await asyncio.to_thread(os.replace, temp, target)
    return DownloadResult(target, size, digest)


async def _open_output(target: Path, checkpoints: DownloadCheckpoints | None, shown: str,
                       log: Log) -> tuple[Path, DirectFile, ResumePoint, str]:
    """The file to download into, where in it to go on and the file's validator: a new
    temporary file, or what an interrupted run of the job left of this download,
    verified (resume.py)."""
    saved = checkpoints.saved(target.name) if checkpoints is not None else None
    if saved is not None:
        resumed = await _reopen(target, saved, shown, log)
        checkpoints.clear(target.name)  # those after the verified one no longer hold
        if resumed is not None:
            temp, _, point = resumed
            checkpoints.save(target.name, temp.name, saved.validator,
                             Checkpoint(point.offset, point.hasher.copy().hexdigest(),
                                        point.complete))
            return *resumed, saved.validator
    temp = temp_path_for(target)
    out = await asyncio.to_thread(DirectFile, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                  0o666)
    return temp, out, ResumePoint.start(), ""


async def _reopen(target: Path, saved: SavedDownload, shown: str,
                  log: Log) -> tuple[Path, DirectFile, ResumePoint] | None:
    """Re-check the file an interrupted run left (by its final name when it had
    completed); None when there is none worth going on with (it is removed)."""
    path = target if os.path.lexists(target) else target.with_name(saved.temp_name)
    try:
        out = await asyncio.to_thread(DirectFile, path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # not a plain file any more (a link, a directory)
        raise _unusable(shown, exc) from None
    try:
        size = os.fstat(out.fd).st_size
        log(f"download {shown}: checking the {size} bytes an interrupted run of the job left")
        stop = threading.Event()
        point = await run_in_own_thread(lambda: verify(out.fd, saved.checkpoints, stop),
                                        stop.set, "download-verify")
        if point.complete and point.offset == size:
            log(f"download {shown}: already complete ({size} bytes verified)")
            return path, out, point
        if point.offset == 0 or path == target:
            log(f"download {shown}: what the interrupted run left does not match its "
                "checkpoints; downloading it again", "warning")
            return _drop(out, path)
        if not saved.validator:
            log(f"download {shown}: the server named no version of the file (no ETag or "
                "Last-Modified), so the interrupted download cannot safely go on; "
                "downloading it again", "warning")
            return _drop(out, path)
        os.ftruncate(out.fd, point.offset)
        log(f"download {shown}: resuming at byte {point.offset} ({size - point.offset} bytes "
            "after the last verified checkpoint dropped)")
        return path, out, point
    except OSError as exc:  # reading or cutting the kept file
        out.close()
        raise _unusable(shown, exc) from None
    except BaseException:
        out.close()
        raise


def _unusable(shown: str, exc: OSError) -> Failed:
    return Failed(f"download {shown}: the file kept for a resume cannot be used "
                  f"({exc.strerror or exc}); retry the job to download it again")


def _drop(out: DirectFile, path: Path) -> None:
    """Remove a file left by an interrupted run that cannot be resumed."""
    out.close()
    path.unlink()
