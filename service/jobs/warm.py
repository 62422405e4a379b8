"""Warm migration: copy a running VM's disks, then only what changed, until cutover.

One mechanism for every provider; a provider only offers a `WarmSource`
(providers/base.py: snapshots, changed extents, ranged reads, shutdown).
`run_warm` makes one raw, sparse image of each disk's full size in the job's staging
directory. Round 1 copies every extent holding data; each later round, every
`precopy_interval` seconds, copies only the extents changed since the previous round's
change id into the same image, in place (pwrite). At cutover (the `cutover` event, set
by a Cutover call, or the `cutover_at` time) the VM is shut down, a last round copies
the last delta, and the images go on as the disks of a cold export.

After each round the images are fsynced, then the round's state is checkpointed in
the store (a download checkpoint per image: the change id reached, the round and the
bytes copied so far), so a run interrupted mid-round (kill -9) is resumed by `Retry`
from the last completed round; re-copying an extent in place is idempotent.

Snapshots: each round's is named `hypersdk-warm-<job id>-<round>` (SNAPSHOT_PREFIX: the
name is its record, known before it exists) and removed when the round ends, however
it ends. A run first removes every snapshot of the VM with that prefix, which only an
interrupted run can have left (one warm migration of a VM at a time). Where a change id
is a snapshot (AWS), the snapshots the images' change ids name are kept (`keep`): the
next round, or a resumed run, diffs against them; the source removes them at the end.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..definitions import JsonObject
from ..disks.download import file_sha256
from ..errors import InvalidArgument
from ..files import pwrite_all
from ..model import (Checkpoint, DiskInfo, DownloadCheckpoints, ExportedDisk, ExportOptions,
                     ExportSink)
from ..providers.base import WarmSource
from ..providers.cleanup import run_to_completion, undone_if_cancelled
from ..providers.common import gather_bounded

CHUNK = 4 << 20  # bytes per ranged read
READS_IN_FLIGHT = 4  # a delta is many small extents: their reads overlap
SNAPSHOT_PREFIX = "hypersdk-warm-"
DEFAULT_PRECOPY_INTERVAL = 3600.0  # an hour: each round costs a snapshot on the source


@dataclass
class WarmSettings:
    precopy_interval: float = DEFAULT_PRECOPY_INTERVAL
    cutover_at: float | None = None  # seconds since the epoch


@dataclass
class DiskState:
    """How far one disk's image is: the change id its content matches, the bytes copied
    over all rounds and the last round completed."""

    change_id: str = ""
    copied: int = 0
    round: int = 0

    def validator(self) -> str:
        return json.dumps({"warm": {"change_id": self.change_id, "round": self.round}})

    @classmethod
    def saved(cls, checkpoints: DownloadCheckpoints | None, name: str) -> "DiskState":
        kept = checkpoints.saved(name) if checkpoints is not None else None
        if kept is None:
            return cls()
        try:
            warm = json.loads(kept.validator)["warm"]
        except (ValueError, KeyError, TypeError):
            return cls()
        return cls(warm["change_id"], kept.checkpoints[-1].offset, warm["round"])


@dataclass
class WarmResult:
    disks: list[ExportedDisk]
    rounds: list[dict]
    shutdown_requested: float  # time.time() when the source's shutdown was asked


@dataclass
class _Disk:
    info: DiskInfo
    path: Path
    fd: int
    state: DiskState


@dataclass
class WarmCopy:
    """The images of one VM's disks and the rounds that fill them."""

    source: WarmSource
    target_dir: Path
    checkpoints: DownloadCheckpoints | None
    sink: ExportSink
    tag: str  # in snapshot names: SNAPSHOT_PREFIX<tag>-<round>
    disks: list[_Disk] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    def open(self, names: list[str]) -> None:
        """Open (or reopen, on a resume) each disk's image at its full size."""
        for info, name in zip(self.source.vm.disks, names):
            path = self.target_dir / name
            state = DiskState.saved(self.checkpoints, name)
            if state != DiskState() and not path.exists():
                self.sink.log(f"{name}: the interrupted run's image is gone; starting over",
                              "warning")
                state = DiskState()
            # a fresh image is created, an interrupted run's (kept for us) is reopened
            flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if state == DiskState() else 0)
            fd = os.open(path, flags, 0o600)
            self.disks.append(_Disk(info, path, fd, state))
            os.ftruncate(fd, info.capacity_bytes)

    @property
    def number(self) -> int:
        return max((disk.state.round for disk in self.disks), default=0)

    async def remove_leftovers(self) -> None:
        """Snapshots an interrupted run left (module docstring)."""
        await run_to_completion(self.source.remove_snapshots(SNAPSHOT_PREFIX,
                                                             self._change_ids()))
        if self.number:
            self.sink.log(f"resuming warm migration after round {self.number}")

    def _change_ids(self) -> frozenset[str]:
        return frozenset(disk.state.change_id for disk in self.disks if disk.state.change_id)

    def _checkpoint(self) -> None:
        if self.checkpoints is None:
            return
        for disk in self.disks:
            self.checkpoints.save(disk.path.name, disk.path.name, disk.state.validator(),
                                  Checkpoint(disk.state.copied, ""))

    async def copy_round(self, final: bool) -> dict:
        """Copy what changed since the last round (everything, the first time)."""
        number = self.number + 1
        name = f"{SNAPSHOT_PREFIX}{self.tag}-{number}"
        started = time.monotonic()
        copied = 0
        try:
            # a cancel while the snapshot is being made waits for it, then removes it
            await undone_if_cancelled(self.source.create_snapshot(name),
                                      lambda _: self.source.remove_snapshots(name))
            for disk in self.disks:
                copied += await self._copy_changes(disk)
            await asyncio.to_thread(_fsync_all, [disk.fd for disk in self.disks])
        finally:  # the images' change ids are this round's only if it completed
            await run_to_completion(self.source.remove_snapshots(SNAPSHOT_PREFIX,
                                                                 self._change_ids()))
        for disk in self.disks:
            disk.state.round = number
        self._checkpoint()
        entry = {"round": number, "bytes": copied,
                 "seconds": round(time.monotonic() - started, 3), "final": final}
        self.rounds.append(entry)
        self.sink.log(f"{'final round' if final else 'pre-copy round'} {number}: {copied} "
                      f"bytes in {entry['seconds']:.2f}s")
        return entry

    async def _copy_changes(self, disk: _Disk) -> int:
        extents, change_id = await self.source.changed_extents(
            disk.info, disk.state.change_id or None)
        total = sum(length for _, length in extents)
        self.sink.add_total(total)
        pieces = [(start, min(CHUNK, offset + length - start))
                  for offset, length in extents for start in range(offset, offset + length, CHUNK)]

        async def copy(piece: tuple[int, int]) -> None:
            data = await self.source.read(disk.info, *piece)
            await asyncio.to_thread(pwrite_all, disk.fd, data, piece[0])
            self.sink.advance(len(data))

        await gather_bounded(pieces, copy, READS_IN_FLIGHT)
        disk.state.change_id = change_id
        disk.state.copied += total
        return total

    async def results(self) -> list[ExportedDisk]:
        disks = []
        for disk in self.disks:
            size, digest = await asyncio.to_thread(file_sha256, disk.path)
            disks.append(ExportedDisk(path=disk.path, format="raw",
                                      capacity_bytes=disk.info.capacity_bytes, file_bytes=size,
                                      sha256=digest, boot_order=disk.info.boot_order,
                                      label=disk.info.label, key=disk.info.key))
        return disks

    def close(self) -> None:
        for disk in self.disks:
            os.close(disk.fd)
        self.disks.clear()


def check_definition(fields: JsonObject, provider_reason: str | None) -> dict:
    """`warm`, `precopy_interval` (seconds, >= 1) and `cutover_at` (an ISO 8601 time with
    a time zone) of a definition; `provider_reason`: why the provider cannot do warm
    migration (None: it can). Without warm the other two are refused."""
    enabled = fields.flag("warm", False)
    interval = fields.integer("precopy_interval", None, minimum=1)
    cutover_at = fields.text("cutover_at", None)
    if not enabled:
        for key in ("precopy_interval", "cutover_at"):
            if fields.data.get(key) is not None:
                raise InvalidArgument(fields.prefix + key, "needs warm: true")
        return {"warm": False}
    if provider_reason is not None:
        raise InvalidArgument(fields.prefix + "warm", provider_reason)
    result = {"warm": True, "precopy_interval": interval or int(DEFAULT_PRECOPY_INTERVAL),
              "cutover_at": None}
    if cutover_at is not None:
        result["cutover_at"] = _iso_time(cutover_at, fields.prefix + "cutover_at")
    return result


def _iso_time(value: str, field: str) -> str:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidArgument(field, "an ISO 8601 time with a time zone, e.g. "
                                     "2026-12-08T02:00:00Z")
    return moment.isoformat()


class _LogSink:
    """An ExportSink that only logs (no progress to report)."""

    def __init__(self, log: Callable[..., None]) -> None:
        self.log = log

    def add_total(self, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


def saved_change_ids(checkpoints: DownloadCheckpoints, names: list[str]) -> frozenset[str]:
    """The change ids an interrupted run's images (`names`, checkpointed) are at."""
    return frozenset(state.change_id for name in names
                     if (state := DiskState.saved(checkpoints, name)).change_id)


async def remove_snapshots_of(provider, vm_identifier: str, job_id: str,
                              keep: frozenset[str], log: Callable[..., None]) -> None:
    """Remove the snapshots of job `job_id`'s rounds (after hypervisord restarted), but
    those its images' change ids name (`keep`): a Retry resumes from them."""
    source = await provider.warm_source(vm_identifier, ExportOptions(), _LogSink(log))
    try:
        await run_to_completion(source.remove_snapshots(f"{SNAPSHOT_PREFIX}{job_id}-", keep))
    finally:
        await source.close()


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def cutover_due(settings: WarmSettings, cutover: asyncio.Event) -> bool:
    return cutover.is_set() or (settings.cutover_at is not None
                                and time.time() >= settings.cutover_at)


async def _wait_next_round(settings: WarmSettings, cutover: asyncio.Event) -> None:
    """Until the next round is due: the interval passed, or the cutover came."""
    delay = settings.precopy_interval
    if settings.cutover_at is not None:
        delay = min(delay, max(0.0, settings.cutover_at - time.time()))
    try:
        await asyncio.wait_for(cutover.wait(), delay)
    except TimeoutError:
        pass


async def run_warm(source: WarmSource, target_dir: Path, names: list[str],
                   checkpoints: DownloadCheckpoints | None, settings: WarmSettings,
                   cutover: asyncio.Event, sink: ExportSink, tag: str,
                   on_round: Callable[[dict], None] | None = None,
                   set_stage: Callable[[str], None] | None = None) -> WarmResult:
    """Pre-copy rounds into `target_dir/names[i]` until cutover, then shut the VM down and
    copy the last delta; see the module docstring. `on_round(entry)` follows each round;
    `set_stage` hears "precopy round <n>" as a pre-copy round begins (the stage until the
    next one) and "cutover" when the cutover does."""
    copy = WarmCopy(source, target_dir, checkpoints, sink, tag)
    try:
        await asyncio.to_thread(copy.open, names)
        await copy.remove_leftovers()
        while True:
            final = cutover_due(settings, cutover)
            if set_stage is not None:
                set_stage("cutover" if final else f"precopy round {copy.number + 1}")
            if final:
                shutdown_requested = time.time()
                sink.log(f"cutover: shutting down {source.vm.name} for the final round")
                await source.shut_down()
            entry = await copy.copy_round(final)
            if on_round is not None:
                on_round(entry)
            if final:
                return WarmResult(await copy.results(), copy.rounds, shutdown_requested)
            await _wait_next_round(settings, cutover)
    finally:
        copy.close()
