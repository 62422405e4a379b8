"""Download a disk blob through its SAS URL: valid page ranges only, in parallel, sparse.

A managed disk exported by SAS is a page blob holding a fixed VHD. Most of a cloud
disk was never written: `Get Page Ranges` names the ranges that hold data, so only
those are fetched (in pieces of chunk_size, at most 4 MiB, `parallel` at a time,
each a ranged GET with azure-storage-blob's retries and resume) and written at
their offsets into a `SparseImage`; everything else stays a hole. A block blob (or a
server without page ranges) is fetched whole the same way. The SAS URL is a secret:
it is passed to the SDK only, never logged.
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterator

from ..model import ExportSink
from .base import require_extra
from .calls import TaskOwner
from .sparse import SparseImage

MAX_PIECE = 4 * 1024 * 1024  # memory in flight is at most parallel * MAX_PIECE


def _pieces(ranges: list[tuple[int, int]], chunk_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most chunk_size covering the [start, end) ranges."""
    for start, end in ranges:
        for offset in range(start, end, chunk_size):
            yield offset, min(chunk_size, end - offset)


async def _valid_ranges(blob: Any, size: int, blob_type: Any) -> list[tuple[int, int]]:
    if blob_type != "PageBlob":  # BlobType is a str enum
        return [(0, size)] if size else []
    ranges: list[tuple[int, int]] = []
    async for page in blob.list_page_ranges():
        if page.cleared:
            continue
        if ranges and ranges[-1][1] == page.start:  # adjacent: one range, fewer requests
            ranges[-1] = (ranges[-1][0], page.end + 1)
        else:
            ranges.append((page.start, page.end + 1))
    return ranges


async def _fetch(blob: Any, image: SparseImage, pieces: Iterator[tuple[int, int]],
                 sink: ExportSink) -> None:
    """One worker: take pieces from the shared iterator until it is empty."""
    for offset, length in pieces:
        stream = await blob.download_blob(offset=offset, length=length)
        data = await stream.readall()
        if len(data) != length:
            raise OSError(f"short read at byte {offset}: {len(data)} of {length} bytes")
        if data != bytes(length):  # all-zero pieces stay holes
            await asyncio.to_thread(image.write, offset, data)
        sink.advance(length)


async def download_disk_blob(sas_url: str, image_factory: Any, *, chunk_size: int,
                             parallel: int, max_retries: int, sink: ExportSink,
                             ca_file: str = "") -> tuple[int, str, int]:
    """Fetch the blob into `image_factory(size)` (a SparseImage); return (size, sha256, bytes read).

    The image is committed on success and discarded on failure or cancellation.
    """
    blob_aio = require_extra("azure.storage.blob.aio", "azure")
    kwargs: dict[str, Any] = {"retry_total": max_retries}
    if ca_file:
        kwargs["connection_verify"] = ca_file
    async with blob_aio.BlobClient.from_blob_url(sas_url, **kwargs) as blob:
        properties = await blob.get_blob_properties()
        size = int(properties.size)
        ranges = await _valid_ranges(blob, size, properties.blob_type)
        to_read = sum(end - start for start, end in ranges)
        sink.add_total(to_read)
        image: SparseImage = await asyncio.to_thread(image_factory, size)
        try:
            pieces = _pieces(ranges, min(chunk_size, MAX_PIECE))
            async with TaskOwner() as workers:
                await asyncio.gather(*(workers.create_task(_fetch(blob, image, pieces, sink))
                                       for _ in range(max(1, parallel))))
            digest = await asyncio.to_thread(image.commit)
        except BaseException:
            image.discard()
            raise
    return size, digest, to_read
