"""AWS's side of warm migration: EBS snapshots read with the EBS direct APIs.

Each round snapshots every volume of the instance (tagged `hypersdk:warm-round` with
the round's name) and waits for the snapshots to complete. A volume's change id is
the snapshot id: the first round lists the blocks holding data (`ListSnapshotBlocks`),
later rounds only the blocks that differ from the previous round's snapshot
(`ListChangedBlocks`); a block changed to zeros has no token and is written as zeros
without a fetch. Blocks are fetched with `GetSnapshotBlock`, checked against their
SHA256, several at a time.

Unlike a vSphere change id, an EBS one is a snapshot that must still exist. So the
mechanism's `keep` (the change ids its images are at) spares those snapshots: after a
round that completed they are that round's, and the round before goes; after a round
that failed they stay the previous round's, and the failed round's go. `close` deletes
the snapshots this source made, so when the migration ends, however it ends, none is
left; after a kill -9 the restart spares the base its checkpoints name, and `Retry`
resumes with a delta (deleting that base after its first round). Where a base is gone
anyway, the round reads every block again and says so in the log.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import Failed, NotFound
from ..model import DiskInfo, ExportSink, VMInfo
from .aws_ebs import BlockPage, ChecksumMismatch, block_data, block_pages, fetch_checked, \
    next_page
from .calls import RetryPolicy

if TYPE_CHECKING:
    from .aws import AwsProvider

ROUND_TAG = "hypersdk:warm-round"


def _extents(blocks: list[int], block_size: int) -> list[tuple[int, int]]:
    """Runs of consecutive block indexes as (offset, length) in bytes."""
    extents: list[tuple[int, int]] = []
    for index in sorted(blocks):
        offset = index * block_size
        if extents and extents[-1][0] + extents[-1][1] == offset:
            extents[-1] = (extents[-1][0], extents[-1][1] + block_size)
        else:
            extents.append((offset, block_size))
    return extents


def _list_all(ebs: Any, snapshot_id: str, base: str | None) -> list[BlockPage]:
    """Every page of the listing (blocking)."""
    pages = block_pages(ebs, snapshot_id, base)
    return [page for page in iter(partial(next_page, pages), None)]


@dataclass
class _Listing:
    """The blocks one round reads from one volume's snapshot: index -> token (None: zeros)."""

    snapshot_id: str
    block_size: int
    tokens: dict[int, str | None]


@dataclass
class AwsWarmSource:
    """A `WarmSource` (providers/base.py) for one EC2 instance."""

    provider: "AwsProvider"
    vm: VMInfo
    sink: ExportSink
    shutdown_timeout: float
    parallel: int
    max_retries: int
    _current: dict[str, str] = field(default_factory=dict)  # volume -> this round's snapshot
    _listings: dict[str, _Listing] = field(default_factory=dict)
    _made: set[str] = field(default_factory=set)  # by this source and not deleted yet
    _executor: ThreadPoolExecutor | None = None

    @property
    def _region(self) -> str:
        return self.vm.extra["region"]

    async def create_snapshot(self, name: str) -> None:
        """Snapshot every volume and wait until the snapshots are complete."""
        made: list[str] = []
        self._current, self._listings = {}, {}
        try:
            for disk in self.vm.disks:
                self._current[disk.key] = await self.provider.create_snapshot(
                    self.vm, disk, made, self.sink, round_name=name)
            await self.provider.wait_snapshots(self._region, made, self.sink)
        finally:
            self._made.update(made)

    async def changed_extents(self, disk: DiskInfo,
                              since: str | None) -> tuple[list[tuple[int, int]], str]:
        snapshot_id = self._current[disk.key]
        ebs = await self.provider.aclient("ebs", self._region)
        pages = await self._listing(ebs, snapshot_id, since, disk)
        listing = _Listing(snapshot_id, pages[0].block_size,
                           {index: token for page in pages for index, token in page.blocks})
        self._listings[disk.key] = listing
        return _extents(list(listing.tokens), listing.block_size), snapshot_id

    async def _listing(self, ebs: Any, snapshot_id: str, since: str | None,
                       disk: DiskInfo) -> list[BlockPage]:
        what = f"listing the blocks of snapshot {snapshot_id} of {disk.key}"
        try:
            return await self.provider.guard(what, asyncio.to_thread(
                _list_all, ebs, snapshot_id, since))
        except NotFound:
            if not since:
                raise
        self.sink.log(f"{disk.key}: the base snapshot {since} is gone; this round reads "
                      "every block again", "warning")
        return await self.provider.guard(what, asyncio.to_thread(
            _list_all, ebs, snapshot_id, None))

    async def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        """The blocks of the current snapshot in [offset, offset+length), fetched in
        parallel (a block the listing gave no token is zeros)."""
        listing = self._listings[disk.key]
        size = listing.block_size
        if offset % size or length % size:
            raise Failed(f"{disk.key}: a read of {length} bytes at {offset} is not in whole "
                         f"blocks of {size} bytes")
        ebs = await self.provider.aclient("ebs", self._region)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.parallel, thread_name_prefix="ebs-warm")
        loop = asyncio.get_running_loop()
        policy = RetryPolicy(retries=self.max_retries, first_delay=0,
                             transient=(ChecksumMismatch,))
        fetches = [fetch_checked(partial(
            loop.run_in_executor, self._executor, block_data, ebs, listing.snapshot_id, index,
            listing.tokens.get(index), size), policy)
            for index in range(offset // size, (offset + length) // size)]
        blocks = await self.provider.guard(
            f"reading snapshot {listing.snapshot_id} of {disk.key}", asyncio.gather(*fetches))
        return b"".join(blocks)

    async def remove_snapshots(self, prefix: str, keep: frozenset[str] = frozenset()) -> None:
        """Delete this instance's snapshots whose round name starts with `prefix`, but the
        bases in `keep`."""
        ec2 = await self.provider.aclient("ec2", self._region)
        found = await self.provider.call(
            f"finding the warm migration snapshots of {self.vm.identifier}",
            ec2.describe_snapshots, OwnerIds=["self"],
            Filters=[{"Name": "tag:hypersdk:instance", "Values": [self.vm.identifier]},
                     {"Name": "tag-key", "Values": [ROUND_TAG]}])
        doomed = sorted(snap["SnapshotId"] for snap in found["Snapshots"]
                        if _round_of(snap).startswith(prefix) and snap["SnapshotId"] not in keep)
        await self._delete(doomed)

    async def _delete(self, snapshot_ids: list[str]) -> None:
        if snapshot_ids:
            await self.provider.delete_snapshots(self._region, snapshot_ids, self.sink)
        self._made.difference_update(snapshot_ids)

    async def shut_down(self) -> None:
        await self.provider.set_power(self.vm, "stop", self.sink, self.shutdown_timeout)

    async def close(self) -> None:
        """Delete the snapshots this source made that are still there (the bases)."""
        await self._delete(sorted(self._made))
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _round_of(snapshot: dict) -> str:
    return next((tag["Value"] for tag in snapshot.get("Tags", []) if tag["Key"] == ROUND_TAG), "")
