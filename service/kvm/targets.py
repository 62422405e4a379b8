"""Targets: named libvirt hosts with a storage pool (`targets:` in the config), where a
job's converted disks are uploaded as volumes and its domain is defined.

The target needs nothing but libvirtd: a disk goes into the pool through libvirt's
storage API (storageVolCreateXML, then a sparse upload stream: holes are not sent, and
the reads go chunk by chunk, so memory stays flat), over the target's URI
(qemu+ssh://, qemu+tls://, or a local qemu:///system). dir, fs and netfs pools hold
qcow2 or raw volumes (the target's `format`, qcow2 unless it says raw); a logical (LVM)
pool holds raw volumes only.

A volume is recorded in the store before it is created (JobContext.record_volume), so a
job that does not complete removes it, also after a crash (job_output.py). A name that
is taken is refused before anything is recorded; if the name is taken in the moment
between that check and the create, libvirt refuses the create and the record is dropped
without deleting anything. A volume is never written over.
"""
from __future__ import annotations

import asyncio
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lxml import etree

from ..config_schema import Field, Schema
from ..redact import redact_url
from ..errors import AlreadyExists, Failed, InvalidArgument, NotFound, Unavailable
from ..disks.ovf_writer import safe_name
from ..disks.threads import from_any_thread, run_stoppable
from .libvirt_import import connect

if TYPE_CHECKING:
    from ..config import Config
    from ..job_kinds import JobContext

VOLUME_FORMATS = ("qcow2", "raw")
FILE_POOLS = ("dir", "fs", "netfs")  # volumes are files: qcow2 or raw
BLOCK_POOLS = ("logical",)           # volumes are block devices: raw only
UPLOAD_STAGE = "upload"
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")  # of a target, as of a provider
_URI_RE = re.compile(r"qemu(\+(ssh|libssh|libssh2|tls|tcp|unix|ext))?://([^\s/?#]*)"
                     r"/(system|session)(\?[^\s#]*)?")
_POOL_RE = re.compile(r"[A-Za-z0-9_.+-]{1,128}")


def libvirt_uri_rule(value: str) -> str | None:
    """A qemu driver URI; no password in it (it is recorded and shown)."""
    match = _URI_RE.fullmatch(value)
    if not match:
        return ("a libvirt URI such as qemu:///system, qemu+ssh://user@host/system"
                "?keyfile=/path or qemu+tls://host/system")
    if ":" in match.group(3).rpartition("@")[0]:
        return "a URI without a password (ssh: a key named by keyfile=; tls: certificates)"
    return None


def names_a_host(uri: str) -> bool:
    """Whether a libvirt URI names a host (`qemu+ssh://kvm2/system`): then it reaches the
    same libvirtd from every instance of a fleet (they share their configuration). One
    without (`qemu:///system`) is each instance's own libvirtd."""
    match = _URI_RE.fullmatch(uri)
    return bool(match and match.group(3).rpartition("@")[2])


TARGET_SCHEMA: Schema = {
    "uri": Field("str", check=libvirt_uri_rule, shown=lambda v: redact_url(str(v))),
    "pool": Field("str", check=lambda v: None if _POOL_RE.fullmatch(v)
                  else "a storage pool name (letters, digits, '_', '.', '+', '-')"),
    "format": Field("str", "qcow2", choices=VOLUME_FORMATS),
}


@dataclass(frozen=True)
class Target:
    name: str
    uri: str
    pool: str
    format: str  # of the volumes it gets: qcow2 | raw


@dataclass(frozen=True)
class Volume:
    """A volume a job uploaded."""

    target: str
    pool: str
    name: str
    path: str  # on the target host
    format: str
    capacity: int

    def to_dict(self) -> dict:
        return {"target": self.target, "pool": self.pool, "volume": self.name,
                "path": self.path, "format": self.format, "capacity_bytes": self.capacity}


def find_target(config: "Config", value: Any, field: str) -> Target | None:
    """The target a job definition names in `field` (None: it names none)."""
    if value is None:
        return None
    configured = sorted(config.targets)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(field, "the name of a target in the config's targets")
    if value not in config.targets:
        raise InvalidArgument(field, f"unknown target {value!r} (configured: "
                              f"{', '.join(configured)})" if configured
                              else f"unknown target {value!r}: the config has no targets")
    return Target(value, **config.targets[value])


def check_format(target: Target, fmt: str, field: str) -> str:
    """The format a job converts to for `target`: its own, which `fmt` ("" or what the
    caller asked for) must not contradict."""
    if fmt and fmt != target.format:
        raise InvalidArgument(field, f"target {target.name!r} takes {target.format} volumes "
                              f"(targets.{target.name}.format)")
    return target.format


def volume_name(vm_name: str, disk: str, fmt: str) -> str:
    """A volume's name for disk `disk` of VM `vm_name` (safe in file and LV names)."""
    return f"{safe_name(vm_name, 100)}-{disk}.{fmt}"


async def preflight_target(target: Target, names: list[str]) -> None:
    """Raise now what the upload would raise later: the pool missing or inactive, a pool
    type or format it cannot take, a volume name taken."""
    await asyncio.to_thread(_with_pool, target, lambda pool: _check_free(target, pool, names))


@dataclass(frozen=True)
class PoolState:
    volumes: frozenset[str]  # the names in the pool
    available: int  # bytes


def read_pool(target: Target) -> PoolState:
    """The target's pool, checked usable, as it is now (blocking): one connection for a
    preflight of many VMs (names are then checked with check_names_free)."""
    import libvirt

    def read(pool) -> PoolState:
        pool.refresh(0)  # files put into a dir pool behind libvirt's back count too
        try:
            names = frozenset(volume.name() for volume in pool.listAllVolumes(0))
        except libvirt.libvirtError as exc:
            raise Failed(f"target {target.name!r}: {exc.get_error_message()}") from exc
        return PoolState(names, pool.info()[3])
    return _with_pool(target, read)


def check_names_free(target: Target, taken: frozenset[str] | set[str], names: list[str]) -> None:
    """AlreadyExists for the first of `names` that is `taken` in the target's pool."""
    for name in names:
        if name in taken:
            raise AlreadyExists(f"target {target.name!r}: a volume named {name!r} already "
                                f"exists in pool {target.pool!r}; it is left untouched")


async def upload_volume(ctx: "JobContext", target: Target, source: Path, name: str,
                        capacity: int) -> Volume:
    """Upload the image file `source` (in the target's format, `capacity` bytes of
    virtual size) into the target's pool as volume `name`; the job advances by the
    file's length (holes included, though not sent)."""
    await preflight_target(target, [name])
    ctx.set_stage(UPLOAD_STAGE)
    length = os.stat(source).st_size
    ctx.add_total(length)
    ctx.log(f"uploading {source.name} ({length} bytes) to target {target.name!r}: "
            f"volume {name!r} in pool {target.pool!r}")
    ctx.record_volume(target.uri, target.pool, name)
    on_bytes = from_any_thread(ctx.advance)
    try:
        path = await run_stoppable(lambda stop: _with_pool(target, lambda pool: _upload(
            target, pool, source, name, capacity, on_bytes, stop)))
    except _NotCreated as exc:
        ctx.forget_volume(target.uri, target.pool, name)  # someone else's: never removed
        raise exc.error from None
    ctx.log(f"volume {name!r} uploaded: {path}")
    return Volume(target.name, target.pool, name, path, target.format, capacity)


def remove_volume(uri: str, pool_name: str, name: str) -> str:
    """Delete volume `name` of pool `pool_name` at `uri` if it is there (blocking): what
    a job created. Returns "" when it is gone, else why it was left."""
    what = f"volume {name!r} of pool {pool_name!r} at {uri}"
    try:
        conn = connect(uri)
    except Unavailable as exc:
        return f"left {what}: {exc.message}"
    import libvirt

    try:
        volume = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(name)
        volume.delete(0)
        return ""
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL,
                                    libvirt.VIR_ERR_NO_STORAGE_POOL):
            return ""
        return f"left {what}: {exc.get_error_message()}"
    finally:
        conn.close()


class _NotCreated(Exception):
    """The create was refused: nothing of the job's is in the pool."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _with_pool(target: Target, work: Callable[[Any], Any]) -> Any:
    """`work(pool)` with the target's pool, checked usable (blocking)."""
    import libvirt

    conn = connect(target.uri)
    try:
        try:
            pool = conn.storagePoolLookupByName(target.pool)
        except libvirt.libvirtError as exc:
            raise NotFound(f"target {target.name!r}: storage pool {target.pool!r} does not "
                           f"exist at {target.uri}: {exc.get_error_message()}") from exc
        if not pool.isActive():
            raise Unavailable(f"target {target.name!r}: storage pool {target.pool!r} at "
                              f"{target.uri} is not active")
        _check_pool_type(target, _pool_type(pool))
        return work(pool)
    finally:
        conn.close()


def _pool_type(pool) -> str:
    return etree.fromstring(pool.XMLDesc(0).encode()).get("type")


def _check_pool_type(target: Target, pool_type: str) -> None:
    if pool_type in BLOCK_POOLS and target.format != "raw":
        raise Failed(f"targets.{target.name}.format: pool {target.pool!r} is a {pool_type} "
                     "pool, which holds raw volumes only: set format: raw")
    if pool_type not in FILE_POOLS + BLOCK_POOLS:
        raise Failed(f"target {target.name!r}: pool {target.pool!r} is a {pool_type} pool; "
                     f"volumes are uploaded into {', '.join(FILE_POOLS + BLOCK_POOLS)} pools")


def _check_free(target: Target, pool, names: list[str]) -> None:
    import libvirt

    pool.refresh(0)  # files put into a dir pool behind libvirt's back count too
    taken = set()
    for name in names:
        try:
            pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue
            raise Failed(f"target {target.name!r}: {exc.get_error_message()}") from exc
        taken.add(name)
    check_names_free(target, taken, names)


def _volume_xml(name: str, capacity: int, fmt: str, pool_type: str) -> str:
    """A file volume allocated as it is written (libvirt would otherwise allocate all
    of a raw file at once, holes included); a logical volume in full (with less, libvirt
    makes a snapshot-backed sparse volume)."""
    volume = etree.Element("volume")
    etree.SubElement(volume, "name").text = name
    etree.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    etree.SubElement(volume, "allocation", unit="bytes").text = \
        str(capacity if pool_type in BLOCK_POOLS else 0)
    etree.SubElement(etree.SubElement(volume, "target"), "format", type=fmt)
    return etree.tostring(volume, encoding="unicode")


def _upload(target: Target, pool, source: Path, name: str, capacity: int,
            on_bytes: Callable[[int], None], stop: threading.Event) -> str:
    """Create the volume and send the file into it, holes as holes; its path."""
    import libvirt

    try:
        volume = pool.createXML(_volume_xml(name, capacity, target.format, _pool_type(pool)), 0)
    except libvirt.libvirtError as exc:
        raise _NotCreated(Failed(f"target {target.name!r}: pool {target.pool!r} refused "
                                 f"volume {name!r}: {exc.get_error_message()}")) from exc
    stream = pool.connect().newStream(0)
    try:
        with open(source, "rb") as fh:
            volume.upload(stream, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            _send_sparse(stream, fh.fileno(), on_bytes, stop)
        stream.finish()
    except BaseException as exc:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass  # the stream failed already
        if stop.is_set():
            raise Failed("upload stopped") from exc
        if isinstance(exc, libvirt.libvirtError):
            raise Failed(f"target {target.name!r}: uploading {source.name} into volume "
                         f"{name!r} failed: {exc.get_error_message()}") from exc
        raise
    return volume.path()


def _send_sparse(stream, fd: int, on_bytes: Callable[[int], None],
                 stop: threading.Event) -> None:
    """Send the file at `fd` from its start: data as data, holes as holes."""

    def section(_stream, _fd) -> tuple[bool, int]:
        here = os.lseek(fd, 0, os.SEEK_CUR)
        end = os.fstat(fd).st_size
        data = _seek(fd, here, os.SEEK_DATA, end)
        if data > here:
            length, in_data = data - here, False
        else:
            length, in_data = _seek(fd, here, os.SEEK_HOLE, end) - here, True
        os.lseek(fd, here, os.SEEK_SET)  # SEEK_DATA/HOLE moved it
        return in_data, length

    def read(_stream, nbytes: int, _fd) -> bytes | int:
        if stop.is_set():
            return -1  # sparseSendAll aborts the stream
        data = os.read(fd, nbytes)
        on_bytes(len(data))
        return data

    def skip(_stream, length: int, _fd) -> int:
        if stop.is_set():
            return -1
        on_bytes(length)
        return os.lseek(fd, length, os.SEEK_CUR)

    stream.sparseSendAll(read, section, skip, fd)


def _seek(fd: int, offset: int, whence: int, end: int) -> int:
    """lseek for SEEK_DATA/SEEK_HOLE; `end` where there is none (ENXIO at the end)."""
    try:
        return os.lseek(fd, offset, whence)
    except OSError:
        return end
