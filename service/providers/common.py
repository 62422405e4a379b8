"""Small pieces the providers share.

- `private_file_rule` / `read_private_file`: credential files (`*_file` settings)
  must be readable by their owner only (mode 0600 or stricter).
- `provider_options` / `shutdown_timeout`: the export job's options as a provider
  reads them (ExportOptions.extra, through definitions.JsonObject).
- `fetch_ranges`: a resumable, checksummed copy of a remote object read in ranges
  through an SDK call (a GCS blob range, a chunk read over WinRM) into a local file,
  a dropped read resumed as the provider's error-mapping hook decides.
  HTTP URLs go through `disks/download.py` instead.
- `OutputFiles`: the disk files one export wrote, removed again if the export fails
  so that nothing partial is left in the target directory.
- `gather_bounded`: work on every disk at once, at most `limit` at a time, in tasks a
  `calls.TaskOwner` owns.
- `poll_until`: the one polling loop for cloud operations (a snapshot, an instance's power
  state, an image, a build) with its deadline and its message.
"""
from __future__ import annotations

import asyncio
import difflib
import hashlib
import os
import stat
from pathlib import Path
import time
from typing import Awaitable, Callable, Iterable, TypeVar

from ..definitions import JsonObject
from ..errors import Failed, InvalidArgument, Retryable, Unavailable
from ..model import ExportSink
from .calls import MapError, RetryPolicy, TaskOwner, with_retries

T = TypeVar("T")

PRIVATE_FILE_RULE = "a file readable by its owner only (mode 0600 or stricter)"


def private_file_rule(value: str) -> str | None:
    """Config check for `*_file` settings: '' (unset) or an owner-only regular file."""
    if not value:
        return None
    try:
        info = os.stat(value)
    except OSError as exc:
        return f"an existing file ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "a regular file"
    if info.st_mode & 0o077:
        return f"{PRIVATE_FILE_RULE}; it has mode {stat.S_IMODE(info.st_mode):04o}"
    return None


def check_filter(vm_filter: dict, allowed: tuple[str, ...]) -> None:
    """Refuse filter keys a provider does not know, naming them and the known ones."""
    for key in vm_filter:
        if key not in allowed:
            raise InvalidArgument(f"filter.{key}", "one of the known filter keys: " + ", ".join(allowed))


def provider_options(extra: dict, known: Iterable[str]) -> JsonObject:
    """The export job's `options.provider_options` (ExportOptions.extra, less the
    shutdown_timeout the job adds to it) read through JsonObject: keys other than `known`
    are refused, naming the field."""
    return JsonObject({key: value for key, value in extra.items() if key != "shutdown_timeout"},
                      known, "options.provider_options.")


def shutdown_timeout(extra: dict, default: float) -> float:
    """The export job's `options.shutdown_timeout`, passed along in ExportOptions.extra."""
    return JsonObject({"shutdown_timeout": extra.get("shutdown_timeout")}, ("shutdown_timeout",),
                      "options.").number("shutdown_timeout", default, above=0, unit="seconds")


def closest(name: str, candidates: list[str]) -> str:
    """' (did you mean a, b?)' for a NotFound message, or ''."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def read_private_file(path: str, field: str) -> str:
    """Read a credential file, checking its mode again (it may have changed since start)."""
    rule = private_file_rule(path)
    if rule:
        raise InvalidArgument(field, rule)
    return Path(path).read_text(encoding="utf-8").strip()


class OutputFiles:
    """Files an export has written so far; `discard()` removes them."""

    def __init__(self, target_dir: Path) -> None:
        self.target_dir = target_dir
        self._paths: list[Path] = []

    def add(self, path: Path) -> None:
        self._paths.append(path)

    def discard(self) -> None:
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths.clear()


async def fetch_ranges(read_range: Callable[[int, int], bytes], target: Path, size: int, *,
                       chunk_size: int, max_retries: int, sink: ExportSink, label: str,
                       map_error: MapError,
                       also_hash: Callable[[bytes], None] | None = None) -> str:
    """Copy `size` bytes read by `read_range(offset, length)` (blocking) into `target`.

    Each range is read in a thread and written at its offset, hashed in order. A range
    whose read fails with what `map_error` (the provider's hook) calls Retryable or
    Unavailable is read again (at most `max_retries` times in a row): that is the resume
    after a dropped connection. Writes go to a temp name in the same directory, are
    fsynced and renamed into place; on any failure the temp file is removed.
    `also_hash` sees every byte in order (for a checksum the server publishes, e.g.
    GCS's md5). Returns the sha256 hex digest.
    """
    policy = RetryPolicy(retries=max_retries, first_delay=0.1, max_delay=5.0,
                         transient=(Retryable, Unavailable))
    temp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    try:
        with open(temp, "wb") as out:
            offset = 0
            while offset < size:
                length = min(chunk_size, size - offset)
                data = await _read_range(read_range, offset, length, policy, map_error,
                                         sink, label)
                await asyncio.to_thread(_write_hashed, out, data, digest, also_hash)
                offset += len(data)
                sink.advance(len(data))
            await asyncio.to_thread(_flush_and_sync, out)
        os.rename(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


async def _read_range(read_range: Callable[[int, int], bytes], offset: int, length: int,
                      policy: RetryPolicy, map_error: MapError, sink: ExportSink,
                      label: str) -> bytes:
    def resuming(error: BaseException, failures: int) -> None:
        sink.log(f"{label}: read at byte {offset} failed ({error}), resuming "
                 f"(attempt {failures}/{policy.retries})", "warning")

    try:
        data = await with_retries(lambda: asyncio.to_thread(read_range, offset, length),
                                  policy, map_error, resuming)
    except policy.transient as exc:
        raise Failed(f"{label}: reading at byte {offset} failed {policy.attempts} times "
                     f"({exc}); giving up") from None
    if len(data) != length:
        raise Failed(f"{label}: asked for {length} bytes at offset {offset}, "
                     f"got {len(data)}; the source changed or is truncated")
    return data


def _write_hashed(out, data: bytes, digest, also_hash: Callable[[bytes], None] | None) -> None:
    """Hash and write one range (in a worker thread: hashing 10 MB takes milliseconds)."""
    digest.update(data)
    if also_hash:
        also_hash(data)
    out.write(data)


def _flush_and_sync(out) -> None:
    out.flush()
    os.fsync(out.fileno())


async def gather_bounded(items: list, fn: Callable, limit: int) -> list:
    """`fn(item)` for every item, at most `limit` at a time, results in order.

    The first failure cancels the others (and waits for them) before it propagates,
    so cleanup that follows sees no disk still being written.
    """
    semaphore = asyncio.Semaphore(max(1, limit))

    async def one(item):
        async with semaphore:
            return await fn(item)

    async with TaskOwner() as owner:
        return list(await asyncio.gather(*(owner.create_task(one(item)) for item in items)))


async def poll_until(check: Callable[[], Awaitable[T | None]], *, interval: float,
                     timeout: float, what: str) -> T:
    """Await `check()` every `interval` s until it returns something other than None, and
    return that. After `timeout` s: Failed saying "<what> did not happen within <timeout>".
    `check` raises to end early (an operation that failed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise Failed(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(interval)
