"""Converting disks while they download: the overlap of the Direct Pipeline's two stages.

An export job with `hyper2kvm_integration` {auto_convert} (no daemon) converts every
disk once the export is done. A streamOptimized VMDK is decoded front to back, so it
can be converted while its bytes arrive: the provider calls
`StreamConversions.begin(disk, target)` for each disk it downloads and feeds the
returned `DiskFeed` from the download's `on_bytes`; the hand-off then collects the
finished images with `results()` and converts the other disks the sequential way.
Providers that never call `begin` simply get the sequential conversion.

The download writes a hidden temporary file, which it names through `on_temp`, and
renames it when complete. On its first bytes the feed hard-links that file under a name of its
own, so the decoder reads the same inode whatever the download renames. How far the
decoder may read is the file's size on disk, never the byte counts, which the
download reports while their write is still in flight.

A disk that turns out not to be a streamOptimized VMDK, or whose download restarts
from byte 0, is left to the sequential conversion, and so is a disk that starts while
MAX_STREAMS others are converting: each conversion holds a thread of the event
loop's default executor while it waits for its download, whose writes need threads
of that same executor. Cancellation or failure of the job stops every conversion
(`close()`), which removes its partial output.
"""
from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Failed
from ..staging import Staging
from ..disks import streamopt
from ..disks.convert import ConvertedImage, convert_image
from ..disks.ovf_writer import safe_name
from ..disks.vmdk import SECTOR, read_sparse_header
from ..disks.threads import run_stoppable

if TYPE_CHECKING:
    from ..job_kinds import JobContext
    from ..model import DiskInfo

MAX_STREAMS = 2  # conversions running at once while their disks download


class JobProgress:
    """An on_progress(done, total) for convert_image that advances the job by deltas,
    never past the disk's planned share of the total; `reported` is what it advanced."""

    def __init__(self, ctx: "JobContext", planned: int) -> None:
        self.ctx, self.planned, self.reported = ctx, planned, 0

    def __call__(self, done: int, _total: int) -> None:
        done = min(done, self.planned)
        if done > self.reported:
            self.ctx.advance(done - self.reported)
            self.reported = done


def is_stream_optimized(path: Path, growing: streamopt.GrowingFile,
                        stop: threading.Event) -> bool:
    """Whether the (growing) file starts with a streamOptimized VMDK header (blocking)."""
    growing.wait_beyond(SECTOR - 1, stop)
    with open(path, "rb") as handle:
        data = handle.read(SECTOR)
    try:
        return read_sparse_header(path, data, None).stream_optimized
    except Failed:  # not a sparse VMDK at all (a descriptor, raw data, too short)
        return False


@dataclass
class DiskFeed:
    """One disk's download, as its stream conversion sees it."""

    owner: "StreamConversions"
    disk: "DiskInfo"
    target: Path          # the download's final name
    output: Path          # the converted image, until the hand-off renames it
    growing: streamopt.GrowingFile = field(default_factory=streamopt.GrowingFile)
    temp: Path | None = None  # the file the download is writing, from download(on_temp=)
    link: Path | None = None
    task: asyncio.Task | None = None
    dropped: bool = False

    def on_temp(self, temp: Path) -> None:
        """Call with `download(on_temp=...)`: the temporary file it writes."""
        self.temp = temp

    def on_bytes(self, nbytes: int) -> None:
        """Call with each `download(on_bytes=...)` count. Never raises: the download
        must not fail because its conversion could not follow."""
        if self.dropped or (self.task is not None and self.task.done()):
            return
        if nbytes < 0:
            self.drop("its download restarted from byte 0")
            return
        if self.link is None and self.owner.running() >= MAX_STREAMS:
            self.drop(f"{MAX_STREAMS} other disks are converting already")
            return
        try:
            if self.link is None:
                self._start()
            self.growing.grew(os.stat(self.link).st_size)
        except OSError as exc:
            self.drop(f"cannot follow its download file ({exc.strerror})")

    def done(self) -> None:
        """The download completed (the file has its final name and size)."""
        if self.link is not None and not self.dropped:
            self.growing.grew(os.stat(self.link).st_size)
        self.growing.finish()

    def failed(self) -> None:
        """The download failed (and says so itself): stop converting it."""
        self.dropped = True
        self.stop()

    def drop(self, why: str) -> None:
        """Leave this disk to the sequential conversion."""
        if not self.dropped:
            self.owner.ctx.log(f"{self.disk.label}: not converting it while it downloads "
                               f"({why}); converting it after the download")
        self.dropped = True
        self.stop()

    def stop(self) -> None:
        """End the conversion (again is harmless: threads.wait_for_thread outlasts a
        second cancel)."""
        self.growing.finish()
        if self.task is not None:
            self.task.cancel()

    def _start(self) -> None:
        temp = self.temp
        if temp is None:
            raise OSError(0, "the download did not say which file it writes")
        link = self.target.with_name(f".{self.target.name}.stream")
        link.unlink(missing_ok=True)  # left by an attempt that was killed
        os.link(temp, link)
        self.link = link
        self.task = asyncio.ensure_future(self.owner.convert(self))


class StreamConversions:
    """The stream conversions of one export job; inert until `enable` is called."""

    def __init__(self, ctx: "JobContext") -> None:
        self.ctx = ctx
        self.staging: Staging | None = None
        self.out_format = "qcow2"
        self.compress = False
        self.feeds: dict[str, DiskFeed] = {}
        self.counted: set[str] = set()  # disks whose capacity is in the job's total already

    def enable(self, staging: Staging, out_format: str, compress: bool) -> None:
        """Convert into `staging` (the output directory's) as the disks download."""
        self.staging, self.out_format, self.compress = staging, out_format, compress

    @property
    def enabled(self) -> bool:
        return self.staging is not None

    def running(self) -> int:
        return sum(1 for feed in self.feeds.values()
                   if feed.task is not None and not feed.task.done())

    def begin(self, disk: "DiskInfo", target: Path) -> DiskFeed:
        """A feed for the download of `disk` into `target` (the provider calls this)."""
        assert self.staging is not None, "begin() before enable()"
        output = self.staging.path / f"{safe_name(disk.key)}.streamed.{self.out_format}"
        feed = DiskFeed(self, disk, Path(target), output)
        self.feeds[disk.key] = feed
        return feed

    async def convert(self, feed: DiskFeed) -> ConvertedImage | None:
        """The conversion task of one feed; None when the disk is left to the sequential way."""
        assert feed.link is not None
        progress = JobProgress(self.ctx, feed.disk.capacity_bytes)
        try:
            if not await run_stoppable(
                    lambda stop: is_stream_optimized(feed.link, feed.growing, stop)):
                self.ctx.log(f"{feed.disk.label}: not a streamOptimized VMDK; converting it "
                             f"after the download")
                return None
            self.ctx.add_total(feed.disk.capacity_bytes)
            self.counted.add(feed.disk.key)
            self.ctx.log(f"{feed.disk.label}: converting to {self.out_format} while it downloads")
            return await convert_image(feed.link, feed.output, out_format=self.out_format,
                                       compress=self.compress, on_progress=progress,
                                       log=self.ctx.log, growing=feed.growing)
        except asyncio.CancelledError:
            if feed.dropped:  # the sequential conversion advances through it again
                self.ctx.advance(-progress.reported)
            raise

    async def results(self) -> dict[str, ConvertedImage]:
        """Wait for the conversions; disk key -> image, for the disks they converted."""
        images = {}
        for key, feed in self.feeds.items():
            if feed.task is None or feed.dropped:
                continue
            image = await feed.task
            if image is not None:
                images[key] = image
        return images

    async def close(self) -> None:
        """Stop what still runs and remove outputs nobody took (the job ends either way;
        what landed is the staging's to keep or remove)."""
        for feed in self.feeds.values():
            feed.stop()
        tasks = [feed.task for feed in self.feeds.values() if feed.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for feed in self.feeds.values():
            await asyncio.to_thread(feed.output.unlink, missing_ok=True)
            if feed.link is not None:
                await asyncio.to_thread(feed.link.unlink, missing_ok=True)
