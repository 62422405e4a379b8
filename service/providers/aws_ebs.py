"""Read an EBS snapshot into a sparse raw image with the EBS direct APIs.

`ListSnapshotBlocks` (paginated) names the blocks that hold data; `GetSnapshotBlock`
fetches them, many at once from a bounded thread pool, each written at
`index * block_size` of a `SparseImage`, so blocks that hold no data stay holes.
For an incremental export `ListChangedBlocks` between the base snapshot and the
new one names only the blocks that differ; they are written over a sparse copy of
the image exported from the base. A block whose checksum (SHA256, as the API sends
it) does not match is fetched again (a `RetryPolicy` without waits, `max_retries`
times), then the export fails.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Any, Awaitable, Callable, Iterator

from ..errors import Failed, Retryable
from ..disks.diskspace import check_free_space
from ..model import ExportSink
from .calls import RetryPolicy, TaskOwner, with_retries
from .sparse import SparseImage

GIB = 1024 ** 3
PAGE_SIZE = 10000  # the largest MaxResults the EBS API accepts


@dataclass(frozen=True)
class BlockPage:
    block_size: int
    volume_bytes: int
    blocks: list[tuple[int, str | None]]  # (index, token to read or None: now all zeros)


@dataclass(frozen=True)
class SnapshotRead:
    """One snapshot to read: all its blocks, or only those changed since `base_snapshot_id`."""

    snapshot_id: str
    target: Path
    base_snapshot_id: str | None = None
    base_image: Path | None = None


def block_pages(ebs: Any, snapshot_id: str,
                base_snapshot_id: str | None = None) -> Iterator[BlockPage]:
    """Blocking generator over the listing pages (run each step in a thread): the blocks
    holding data, or those changed since `base_snapshot_id`."""
    token = None
    while True:
        kwargs: dict[str, Any] = {"MaxResults": PAGE_SIZE}
        if token:
            kwargs["NextToken"] = token
        if base_snapshot_id:
            page = ebs.list_changed_blocks(FirstSnapshotId=base_snapshot_id,
                                           SecondSnapshotId=snapshot_id, **kwargs)
            blocks = [(b["BlockIndex"], b.get("SecondBlockToken"))
                      for b in page.get("ChangedBlocks", [])]
        else:
            page = ebs.list_snapshot_blocks(SnapshotId=snapshot_id, **kwargs)
            blocks = [(b["BlockIndex"], b["BlockToken"]) for b in page.get("Blocks", [])]
        yield BlockPage(page["BlockSize"], page["VolumeSize"] * GIB, blocks)
        token = page.get("NextToken")
        if not token:
            return


def next_page(pages: Iterator[BlockPage]) -> BlockPage | None:
    return next(pages, None)


def _expected_checksum(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class ChecksumMismatch(Retryable):
    """A block whose data did not match the checksum the API sent: fetched again."""


def block_data(ebs: Any, snapshot_id: str, index: int, token: str | None,
               block_size: int) -> bytes:
    """One block's data (blocking): fetched and checked against its checksum, or zeros
    when the listing gave it no token (it holds no data any more)."""
    if token is None:
        return bytes(block_size)
    response = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
    data = response["BlockData"].read()
    checksum = response.get("Checksum")
    algorithm = response.get("ChecksumAlgorithm")
    if checksum and algorithm == "SHA256" and _expected_checksum(data) != checksum:
        raise ChecksumMismatch(f"snapshot {snapshot_id} block {index}: the data did not match "
                               "its SHA256 checksum")
    return data


def _fetch_block(ebs: Any, image: SparseImage, snapshot_id: str, index: int, token: str | None,
                 block_size: int) -> int:
    """Fetch one block (or zero it when it has no token any more) and write it; bytes written."""
    data = block_data(ebs, snapshot_id, index, token, block_size)
    image.write(index * block_size, data)
    return len(data)


async def fetch_checked(fetch: Callable[[], Awaitable[int]], policy: RetryPolicy) -> int:
    """`fetch()` (one block), again while its data does not match its checksum."""
    try:
        return await with_retries(fetch, policy, lambda exc: exc)
    except ChecksumMismatch as exc:
        raise Failed(f"{exc} in {policy.attempts} attempts") from None


async def read_snapshot(ebs: Any, read: SnapshotRead, *, parallel: int, max_retries: int,
                        sink: ExportSink) -> tuple[int, str, int]:
    """Write the snapshot's image to `read.target`; return (size, sha256, blocks fetched).

    Nothing is left at the target name or beside it if this fails or is cancelled.
    """
    pages = block_pages(ebs, read.snapshot_id, read.base_snapshot_id)
    page = await asyncio.to_thread(next_page, pages)
    assert page is not None  # the generator always yields a first page
    if read.base_image is not None:
        base_size = read.base_image.stat().st_size
        if base_size > page.volume_bytes:
            raise Failed(f"the base image {read.base_image} ({base_size} bytes) is larger than "
                         f"snapshot {read.snapshot_id} ({page.volume_bytes} bytes)")
        await asyncio.to_thread(check_free_space, read.target.parent, base_size,
                                f"the copy of base image {read.base_image.name}")
    image = await asyncio.to_thread(SparseImage, read.target, page.volume_bytes, read.base_image)
    executor = ThreadPoolExecutor(parallel, thread_name_prefix="ebs-block")
    loop = asyncio.get_running_loop()
    policy = RetryPolicy(retries=max_retries, first_delay=0, transient=(ChecksumMismatch,))
    fetched = 0
    blocks = TaskOwner()
    try:
        while page is not None:
            await asyncio.to_thread(check_free_space, read.target.parent,
                                    len(page.blocks) * page.block_size,
                                    f"the blocks of snapshot {read.snapshot_id}")
            sink.add_total(len(page.blocks) * page.block_size)
            tasks = [blocks.create_task(fetch_checked(
                partial(loop.run_in_executor, executor, _fetch_block, ebs, image,
                        read.snapshot_id, index, token, page.block_size), policy))
                for index, token in page.blocks]
            for task in asyncio.as_completed(tasks):
                sink.advance(await task)
            fetched += sum(1 for _, token in page.blocks if token is not None)
            page = await asyncio.to_thread(next_page, pages)
        digest = await asyncio.to_thread(image.commit)
    except BaseException:
        await blocks.close()  # no block is fetched again
        # let block writes still running finish before the file goes away
        await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        image.discard()
        raise
    finally:
        executor.shutdown(wait=False)
    return image.size, digest, fetched
