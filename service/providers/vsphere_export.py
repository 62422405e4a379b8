"""Getting a powered-off VM's disks out of vSphere, over one of two HTTP paths.

1. The NFC export lease (`ExportVm` -> `HttpNfcLease`): wait until the lease is
   ready, download each disk's device URL (stream-optimized VMDKs), keep the
   lease alive with `HttpNfcLeaseProgress` while that runs, check our SHA-256
   against the server's `HttpNfcLeaseGetManifest` where it offers one, then
   `HttpNfcLeaseComplete`, or `HttpNfcLeaseAbort` on failure or cancellation.
2. When the server has no `ExportVm` (govmomi's simulator, some ESXi setups), the
   disk files over the datastore HTTP interface
   (`/folder/<path>?dcPath=..&dsName=..` with the session cookie). A disk that is
   a text descriptor with separate extents (`disk.vmdk` + `disk-flat.vmdk`, the
   usual datastore layout) has its extents fetched too and joined by qemu-img into
   one monolithicSparse VMDK, so every exported disk is one self-contained file.

Either way every disk goes through `disks.download.download` (streamed, hashed,
resumed with Range, size-checked, write-then-rename); the disks of one VM download
in parallel up to `options.parallel_disks`. If any disk fails, the finished ones
are removed too, so the target directory holds a complete set or nothing. A
disk's download also feeds `options.stream_consumer`, when set, so its conversion
can run while it downloads (`jobs/overlap.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp

from ..errors import Failed
from ..disks.convert import run_qemu_img_convert
from ..disks.download import download, file_sha256
from ..files import temp_path_for
from ..disks.ovf_writer import safe_name
from ..disks.vmdk import MAX_DESCRIPTOR_BYTES, descriptor_text, parse_descriptor
from ..redact import redact_url
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, VMInfo
from .calls import TaskOwner
from .common import gather_bounded, poll_until
from .vsphere_session import SessionPool

LEASE_READY_TIMEOUT = 300.0
UNSUPPORTED_FAULTS = ("MethodNotFound", "NotSupported", "NotImplemented")


@dataclass
class DiskSource:
    disk: DiskInfo
    url: str
    target: Path
    expected_size: int | None


def _target(target_dir: Path, vm: VMInfo, index: int) -> Path:
    return target_dir / f"{safe_name(vm.name)}-disk{index + 1}.vmdk"


# --- the NFC export lease ------------------------------------------------------------


def open_export_lease(si, identifier: str):
    """`ExportVm` on the VM, or None when the server does not offer it (blocking)."""
    from pyVmomi import vim, vmodl

    try:
        return vim.VirtualMachine(identifier, si._stub).ExportVm()
    except vmodl.MethodFault as fault:
        if type(fault).__name__.split(".")[-1] in UNSUPPORTED_FAULTS:
            return None
        raise Failed(f"ExportVm on {identifier} failed: {fault.msg}") from None


def _lease_ready(si, lease):
    """The lease's info once it is ready, None while it is not yet (blocking)."""
    state = str(lease.state)
    if state == "error":
        error = lease.error
        raise Failed(f"the export lease failed: {getattr(error, 'msg', None) or error}")
    return lease.info if state == "ready" else None


def _lease_url(url: str, host: str) -> str:
    """Device URLs may name the host as '*': it means the host we talk to."""
    parts = urlsplit(url)
    if parts.hostname == "*":
        netloc = parts.netloc.replace("*", host, 1)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def _disk_devices(info) -> list:
    return [d for d in info.deviceUrl if getattr(d, "disk", False)]


def _lease_sources(info, pool: SessionPool, vm: VMInfo, target_dir: Path) -> list[DiskSource]:
    """One source per disk device URL; they come in the VM's disk order."""
    urls = _disk_devices(info)
    if len(urls) != len(vm.disks):
        raise Failed(f"the export lease offers {len(urls)} disk URLs for {len(vm.disks)} disks")
    return [DiskSource(disk, _lease_url(device.url, pool.url_host), _target(target_dir, vm, i), None)
            for i, (disk, device) in enumerate(zip(vm.disks, urls))]


class _LeaseKeeper:
    """Reports progress to the lease every `interval` seconds so it does not time out."""

    def __init__(self, pool: SessionPool, lease, total: int, interval: float) -> None:
        self.pool, self.lease, self.total, self.interval = pool, lease, max(total, 1), interval
        self.done = 0

    def count(self, nbytes: int) -> None:
        self.done += nbytes

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            percent = min(99, int(self.done * 100 / self.total))
            await self.pool.run(lambda si: self.lease.HttpNfcLeaseProgress(percent))


def _lease_interval(info) -> float:
    timeout = getattr(info, "leaseTimeout", None) or 300
    return max(1.0, min(60.0, timeout / 4))


async def _export_with_lease(pool: SessionPool, lease, vm: VMInfo, target_dir: Path,
                             options: ExportOptions, sink: ExportSink) -> list[ExportedDisk]:
    try:
        info = await poll_until(lambda: pool.run(_lease_ready, lease), interval=0.5,
                                timeout=LEASE_READY_TIMEOUT, what="the export lease being ready")
        sink.log(f"export lease ready: {len(vm.disks)} disk(s)")
        sources = _lease_sources(info, pool, vm, target_dir)
        total = sum(d.capacity_bytes for d in vm.disks)
        keeper = _LeaseKeeper(pool, lease, total, _lease_interval(info))
        sink.add_total(total)
        async with TaskOwner() as keepalive:
            keepalive.create_task(keeper.run())
            disks = await _download_all(pool, sources, options, sink, keeper.count)
        _settle(sink, keeper.done, total)
        try:
            await _verify_checksums(pool, lease, disks, [d.key for d in _disk_devices(info)],
                                    sink)
            await pool.run(lambda si: lease.HttpNfcLeaseProgress(100))
            await pool.run(lambda si: lease.HttpNfcLeaseComplete())
        except BaseException:
            for disk in disks:
                disk.path.unlink(missing_ok=True)
            raise
        sink.log("export lease completed")
        return disks
    except BaseException:
        await asyncio.shield(_abort(pool, lease, sink))
        raise


def _settle(sink: ExportSink, received: int, estimate: int) -> None:
    """The lease's streams are compressed: their size is unknown up front and the capacity
    was the estimate. Make done reach the total: grow it, or count the rest as done."""
    if received > estimate:
        sink.add_total(received - estimate)
    else:
        sink.advance(estimate - received)


def _server_checksums(si, lease) -> dict[str, tuple[str, str]]:
    """deviceUrl key -> (algorithm, hex digest) from HttpNfcLeaseGetManifest, where offered."""
    from pyVmomi import vmodl

    try:
        entries = lease.HttpNfcLeaseGetManifest() or []
    except vmodl.MethodFault as fault:
        if type(fault).__name__.split(".")[-1] in UNSUPPORTED_FAULTS:
            return {}
        raise Failed(f"HttpNfcLeaseGetManifest failed: {fault.msg}") from None
    return {entry.key: ((getattr(entry, "checksumType", None) or "sha1").lower(),
                        (getattr(entry, "checksum", None) or entry.sha1 or "").lower())
            for entry in entries}


async def _verify_checksums(pool: SessionPool, lease, disks: list[ExportedDisk],
                            device_keys: list[str], sink: ExportSink) -> None:
    """Compare our SHA-256 of each disk with the server's manifest (vSphere 7+ offers one)."""
    checksums = await pool.run(_server_checksums, lease)
    for index, (disk, key) in enumerate(zip(disks, device_keys)):
        algorithm, expected = checksums.get(key, ("", ""))
        label = f"disk {index + 1}/{len(disks)}"
        if algorithm != "sha256" or not expected:
            sink.log(f"{label}: the server's manifest has no SHA-256 for it; size checked only")
        elif expected != disk.sha256:
            raise Failed(f"{label} ({disk.path.name}): SHA-256 {disk.sha256} differs from the "
                         f"server's manifest ({expected})")
        else:
            sink.log(f"{label}: checksum ok (SHA-256 matches the server's manifest)")


async def _abort(pool: SessionPool, lease, sink: ExportSink) -> None:
    try:
        await pool.run(lambda si: lease.HttpNfcLeaseAbort())
        sink.log("export lease aborted", "warning")
    except Exception as exc:  # the lease may already be gone; the export failed anyway
        sink.log(f"could not abort the export lease: {exc}", "warning")


# --- the datastore /folder interface ---------------------------------------------------


def datastore_url(pool: SessionPool, datastore_path: str, datacenter: str) -> str:
    """`[ds] dir/disk.vmdk` -> `https://host:port/folder/dir/disk.vmdk?dcPath=..&dsName=..`."""
    match = re.match(r"^\[([^\]]+)\]\s*(.+)$", datastore_path)
    if not match:
        raise Failed(f"cannot read the disk file {datastore_path!r}: not a datastore path")
    query = urlencode({"dcPath": datacenter, "dsName": match.group(1)})
    return f"{pool.base_url}/folder/{quote(match.group(2))}?{query}"


async def _head_size(session: aiohttp.ClientSession, url: str, headers: dict, ssl) -> int | None:
    async with session.head(url, headers=headers, ssl=ssl) as response:
        if response.status == 404:
            raise Failed(f"the disk file {redact_url(url)} is missing on the datastore")
        if response.status != 200:
            raise Failed(f"the datastore refused {redact_url(url)}: HTTP {response.status}")
        return response.content_length


async def _datastore_sources(session: aiohttp.ClientSession, pool: SessionPool, vm: VMInfo,
                             target_dir: Path, headers: dict, ssl) -> list[DiskSource]:
    sources = []
    for index, disk in enumerate(vm.disks):
        url = datastore_url(pool, disk.location, vm.datacenter)
        size = await _head_size(session, url, headers, ssl)
        sources.append(DiskSource(disk, url, _target(target_dir, vm, index), size))
    return sources


def _read_descriptor(path: Path) -> str | None:
    """The text of a VMDK descriptor file, or None for a self-contained (sparse) VMDK."""
    if path.stat().st_size > MAX_DESCRIPTOR_BYTES:
        return None
    data = path.read_bytes()
    text = descriptor_text(data)
    if data[:4] == b"KDMV" or "createType" not in text:
        return None
    return text


def sibling_path(datastore_path: str, name: str) -> str:
    """`[ds] dir/disk.vmdk` + `disk-flat.vmdk` -> `[ds] dir/disk-flat.vmdk`."""
    head, _, rel = datastore_path.partition("] ")
    return f"{head}] {PurePosixPath(rel).parent / name}".replace("] ./", "] ")


async def _join_extents(pool: SessionPool, vm: VMInfo, disk: ExportedDisk,
                        options: ExportOptions, sink: ExportSink) -> ExportedDisk:
    """A datastore disk is usually a descriptor naming its data file (`disk-flat.vmdk`):
    fetch the extents next to it and join them into one monolithicSparse VMDK."""
    text = await asyncio.to_thread(_read_descriptor, disk.path)
    if text is None:
        return disk
    location = next(d.location for d in vm.disks if d.key == disk.key)
    extents = [e for e in parse_descriptor(disk.path, text)["extents"] if e["type"] != "ZERO"]
    work = disk.path.with_name(f".{disk.path.stem}.extents")
    joined = temp_path_for(disk.path)
    await asyncio.to_thread(work.mkdir)
    try:
        descriptor = work / PurePosixPath(location.partition("] ")[2]).name
        await asyncio.to_thread(os.replace, disk.path, descriptor)
        sources = []
        for extent in extents:
            name = extent["file"]
            if PurePosixPath(name).name != name or name in (".", ".."):
                raise Failed(f"{location}: extent file {name!r} is not a plain file name")
            url = datastore_url(pool, sibling_path(location, name), vm.datacenter)
            sources.append(DiskSource(DiskInfo(key=name, label=name, capacity_bytes=0), url,
                                      work / name, None))
        sink.add_total(sum(e["size_bytes"] for e in extents))
        await _download_all(pool, sources, options, sink, what="extent")
        sink.log(f"{disk.path.name}: joining {len(extents)} extent(s) into one sparse VMDK")
        await run_qemu_img_convert(descriptor, "vmdk", joined, "vmdk", False, lambda _: None)
        await asyncio.to_thread(os.replace, joined, disk.path)
    finally:
        joined.unlink(missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, work, True)
    size, digest = await asyncio.to_thread(file_sha256, disk.path)
    return dataclasses.replace(disk, file_bytes=size, sha256=digest)


# --- shared ----------------------------------------------------------------------------


async def _download_all(pool: SessionPool, sources: list[DiskSource], options: ExportOptions,
                        sink: ExportSink, count=None, what: str = "disk") -> list[ExportedDisk]:
    cookie = await pool.run(SessionPool.cookie)
    headers = {"Cookie": cookie.split(";")[0]}
    finished: list[Path] = []
    # disks resume after an interruption; extents are joined into one file, which is
    # what the checkpoints would then no longer describe
    checkpoints = options.checkpoints if what == "disk" else None

    def on_bytes(nbytes: int) -> None:
        sink.advance(nbytes)
        if count is not None:
            count(nbytes)

    async def one(numbered: tuple[int, DiskSource]) -> ExportedDisk:
        index, source = numbered
        sink.log(f"{what} {index + 1}/{len(sources)}: {source.disk.label} from "
                 f"{redact_url(source.url)}")
        feed = (options.stream_consumer.begin(source.disk, source.target)
                if options.stream_consumer is not None and what == "disk" else None)

        def disk_bytes(nbytes: int) -> None:
            on_bytes(nbytes)
            if feed is not None:
                feed.on_bytes(nbytes)

        try:
            result = await download(source.url, source.target,
                                    expected_size=source.expected_size,
                                    chunk_size=options.chunk_size,
                                    max_retries=options.max_retries, on_bytes=disk_bytes,
                                    log=sink.log, headers=headers, ssl=pool.ssl_context(),
                                    read_timeout=pool.timeout,
                                    on_temp=feed.on_temp if feed is not None else None,
                                    checkpoints=checkpoints)
        except BaseException:
            if feed is not None:
                feed.failed()
            raise
        if feed is not None:
            feed.done()
        finished.append(result.path)
        sink.log(f"{what} {index + 1}/{len(sources)} done: {result.size} bytes, "
                 f"sha256 {result.sha256}")
        return ExportedDisk(path=result.path, format="vmdk",
                            capacity_bytes=source.disk.capacity_bytes,
                            file_bytes=result.size, sha256=result.sha256,
                            boot_order=source.disk.boot_order, label=source.disk.label,
                            key=source.disk.key)

    try:
        return await gather_bounded(list(enumerate(sources)), one, options.parallel_disks)
    except BaseException:
        if checkpoints is None:  # else the job keeps them for a resume, or removes them
            for path in finished:
                path.unlink(missing_ok=True)
        raise


def _http_session(options: ExportOptions) -> aiohttp.ClientSession:
    """For the HEAD requests that size the datastore files (downloads use their own)."""
    connector = aiohttp.TCPConnector(limit=max(2, options.parallel_disks * 2))
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


async def export_vm_disks(pool: SessionPool, vm: VMInfo, target_dir: Path,
                          options: ExportOptions, sink: ExportSink) -> list[ExportedDisk]:
    """Download every disk of the (powered-off) VM into target_dir; see the module docstring."""
    if not vm.disks:
        raise Failed(f"VM {vm.name} ({vm.identifier}) has no disks to export")
    lease = await pool.run(open_export_lease, vm.identifier)
    if lease is not None:
        return await _export_with_lease(pool, lease, vm, target_dir, options, sink)
    sink.log("the server offers no export lease (ExportVm); reading the disk files from the "
             "datastore")
    cookie = await pool.run(SessionPool.cookie)
    headers = {"Cookie": cookie.split(";")[0]}
    async with _http_session(options) as session:
        sources = await _datastore_sources(session, pool, vm, target_dir, headers,
                                           pool.ssl_context())
    sink.add_total(sum(s.expected_size or s.disk.capacity_bytes for s in sources))
    disks = await _download_all(pool, sources, options, sink)
    try:
        return [await _join_extents(pool, vm, disk, options, sink) for disk in disks]
    except BaseException:
        for disk in disks:
            disk.path.unlink(missing_ok=True)
        raise
