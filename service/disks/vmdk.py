"""Read a VMDK's metadata: text descriptor, sparse headers, extents, delta-disk links.

Only headers and allocation tables are read, never grain data. A VMDK is either a
text descriptor file (monolithicFlat, twoGbMaxExtent*, vmfs, delta descriptors)
naming extent files next to it, or a sparse extent (monolithicSparse,
streamOptimized) that starts with a binary `SparseExtentHeader` and embeds its
descriptor. Anything that contradicts itself is refused with a message naming the
file and the broken rule.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import Failed, InvalidArgument

SECTOR = 512
SPARSE_MAGIC = 0x564D444B  # "KDMV"
COWD_MAGIC = 0x44574F43    # "COWD": ESX vmfsSparse, not supported
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
MAX_CAPACITY_BYTES = 64 << 40  # VMDK's limit is 62 TiB
MAX_DESCRIPTOR_BYTES = 64 * 1024
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
NO_PARENT_CID = "ffffffff"

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
# numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, 4 newline chars,
# compressAlgorithm (then 433 bytes of padding)
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(FLAT|SPARSE|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW|SESPARSE)'
    r'(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$')


@dataclass(frozen=True)
class SparseHeader:
    version: int
    flags: int
    capacity_sectors: int
    grain_sectors: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    gd_offset: int
    overhead_sectors: int
    compress_algorithm: int

    @property
    def stream_optimized(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED and self.flags & FLAG_MARKERS)


def _fail(path: Path, what: str) -> Failed:
    return Failed(f"{path}: {what}")


def read_sparse_header(path: Path, data: bytes, file_size: int | None) -> SparseHeader:
    """Decode and sanity-check a 512-byte SparseExtentHeader.

    `file_size` None means the file is still growing (a download): offsets are not
    checked against its end.
    """
    if len(data) < SECTOR:
        raise _fail(path, f"truncated: {len(data)} bytes, a sparse VMDK header needs {SECTOR}")
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd_off,
     overhead, _unclean, newlines, compress) = _HEADER.unpack_from(data)
    if magic != SPARSE_MAGIC:
        raise _fail(path, "not a sparse VMDK (bad magic)")
    header = SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes,
                          gd_off, overhead, compress)
    if version not in (1, 2, 3):
        raise _fail(path, f"unsupported sparse header version {version}")
    if flags & 1 and newlines != b"\n \r\n":
        raise _fail(path, "header newline check failed (file was transferred in text mode?)")
    if grain < 8 or grain & (grain - 1) or grain > 2048:
        raise _fail(path, f"grain size {grain} sectors is not a power of two from 8 to 2048")
    if capacity * SECTOR > MAX_CAPACITY_BYTES:
        raise _fail(path, f"header claims a capacity of {capacity * SECTOR} bytes, above "
                          f"VMDK's limit of {MAX_CAPACITY_BYTES}")
    if gtes != 512:
        raise _fail(path, f"{gtes} entries per grain table, VMDK uses 512")
    if compress not in (0, 1):
        raise _fail(path, f"unknown compression algorithm {compress}")
    if file_size is None:
        return header
    if desc_size and (desc_off + desc_size) * SECTOR > file_size:
        raise _fail(path, f"header puts the descriptor at sectors {desc_off}+{desc_size}, "
                          f"past the end of the file ({file_size} bytes)")
    if gd_off != GD_AT_END and gd_off * SECTOR >= file_size:
        raise _fail(path, f"header puts the grain directory at sector {gd_off}, past the end "
                          f"of the file ({file_size} bytes)")
    if overhead * SECTOR > file_size:
        raise _fail(path, f"header claims {overhead} sectors of metadata, more than the "
                          f"file holds ({file_size} bytes): truncated")
    return header


def descriptor_text(data: bytes) -> str:
    """A descriptor's text: up to its first NUL, as qemu and VMware read it (qemu-img
    leaves stale bytes after that NUL when it rewrites a descriptor with a shorter CID)."""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_descriptor(path: Path, text: str) -> dict:
    """Parse the text descriptor: `key=value` lines and extent lines."""
    values: dict[str, str] = {}
    extents: list[dict] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT_RE.match(line)
        if match:
            access, sectors, kind, name, offset = match.groups()
            if kind != "ZERO" and not name:
                raise _fail(path, f"descriptor line {lineno}: {kind} extent without a file name")
            extents.append({"access": access, "size_bytes": int(sectors) * SECTOR, "type": kind,
                            "file": name, "offset": int(offset or 0) * SECTOR})
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise _fail(path, f"descriptor line {lineno} is neither key=value nor an extent: "
                              f"{line[:60]!r}")
        values[key.strip()] = value.strip().strip('"')
    if not extents:
        raise _fail(path, "descriptor lists no extents")
    if "createType" not in values:
        raise _fail(path, "descriptor has no createType")
    return {"values": values, "extents": extents}


def open_regular(path: Path) -> BinaryIO:
    """Open a VMDK file for reading without following a link at its name: a descriptor
    or an extent that is a symlink (to a file the caller could not read) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(str(path), "a symlink: refused") from None
        if exc.errno == errno.ENOENT:
            raise InvalidArgument(str(path), "no such file") from None
        raise InvalidArgument(str(path), exc.strerror or str(exc)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(str(path), "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _extent_path(path: Path, name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(str(path), f"extent file {name!r} must be a plain file name in "
                                         "the descriptor's directory")
    return path.parent / name


GD_CHUNK_ENTRIES = 16384  # grain directory entries read at a time (64 KiB)


def grain_tables_complete(fh, header: SparseHeader, file_size: int) -> bool:
    """True when every grain table and grain, up to the last one, lies inside the file.

    The grain directory is read in chunks: a header may claim a capacity whose
    directory has millions of entries, and memory must not grow with that claim."""
    gt_coverage = header.gtes_per_gt * header.grain_sectors
    num_gts = -(-header.capacity_sectors // gt_coverage)
    if header.gd_offset * SECTOR + num_gts * 4 > file_size:
        return False
    last = 0
    for first in range(0, num_gts, GD_CHUNK_ENTRIES):
        count = min(GD_CHUNK_ENTRIES, num_gts - first)
        fh.seek(header.gd_offset * SECTOR + first * 4)
        chunk = fh.read(count * 4)
        if len(chunk) != count * 4:
            return False
        for gt_sector in struct.unpack(f"<{count}I", chunk):
            if gt_sector == 0:
                continue
            if gt_sector * SECTOR + header.gtes_per_gt * 4 > file_size:
                return False
            fh.seek(gt_sector * SECTOR)
            last = max(last, *struct.unpack(f"<{header.gtes_per_gt}I",
                                             fh.read(header.gtes_per_gt * 4)))
    if last <= 1:  # no data, or only zero grains
        return True
    grain_end = last * SECTOR + header.grain_sectors * SECTOR
    if header.stream_optimized:
        fh.seek(last * SECTOR)
        marker = fh.read(12)
        if len(marker) < 12:
            return False
        grain_end = last * SECTOR + 12 + struct.unpack_from("<I", marker, 8)[0]
    return grain_end <= file_size


def _footer_ok(fh, file_size: int) -> bool:
    """VMware's streamOptimized ends with: footer marker, footer header, EOS marker."""
    if file_size % SECTOR or file_size < 3 * SECTOR:
        return False
    fh.seek(file_size - 3 * SECTOR)
    tail = fh.read(3 * SECTOR)
    _val, size, kind = struct.unpack_from("<QII", tail, 0)
    footer_magic = struct.unpack_from("<I", tail, SECTOR)[0]
    return (size == 0 and kind == MARKER_FOOTER and footer_magic == SPARSE_MAGIC
            and tail[2 * SECTOR:].count(0) == SECTOR)


def read_footer(path: Path, fh, file_size: int) -> SparseHeader:
    """The footer copy of the header (holds the real gdOffset when GD_AT_END)."""
    fh.seek(file_size - 2 * SECTOR)
    return read_sparse_header(path, fh.read(SECTOR), file_size)


def _sparse_extent_info(path: Path) -> tuple[SparseHeader, str | None, bool]:
    """Header, embedded descriptor text (or None) and completeness of one sparse extent."""
    with open_regular(path) as fh:
        file_size = os.fstat(fh.fileno()).st_size
        header = read_sparse_header(path, fh.read(SECTOR), file_size)
        text = None
        if header.descriptor_offset and header.descriptor_size:
            if header.descriptor_size * SECTOR > MAX_DESCRIPTOR_BYTES:
                raise _fail(path, f"embedded descriptor of {header.descriptor_size} sectors is "
                                  f"larger than {MAX_DESCRIPTOR_BYTES} bytes")
            fh.seek(header.descriptor_offset * SECTOR)
            text = descriptor_text(fh.read(header.descriptor_size * SECTOR))
        if header.gd_offset != GD_AT_END:
            complete = grain_tables_complete(fh, header, file_size)
        else:
            complete = _footer_ok(fh, file_size)
            if complete:
                footer = read_footer(path, fh, file_size)
                if footer.capacity_sectors != header.capacity_sectors:
                    raise _fail(path, f"footer capacity {footer.capacity_sectors * SECTOR} "
                                      f"disagrees with header capacity "
                                      f"{header.capacity_sectors * SECTOR}")
    return header, text, complete


def _read_text_descriptor(path: Path) -> str:
    with open_regular(path) as fh:
        data = fh.read(MAX_DESCRIPTOR_BYTES + 1)
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise InvalidArgument(str(path), "not a VMDK: no sparse header and larger than a text "
                                         "descriptor can be")
    text = descriptor_text(data)
    if "createType" not in text:
        raise InvalidArgument(str(path), "not a VMDK: neither a sparse header nor a text "
                                         "descriptor with createType")
    return text


Embedded = tuple[Path, SparseHeader, bool]  # sparse file, its header, its completeness


def _check_extent(path: Path, extent: dict, embedded: Embedded | None, is_self: bool) -> None:
    """Fill in present/complete for one extent, refusing headers that contradict it
    (`is_self`: see _is_self)."""
    if extent["type"] == "ZERO":
        extent.update(present=True, complete=True)
        return
    if embedded and is_self:
        target, header, complete = embedded
    else:
        target = _extent_path(path, extent["file"])
        try:
            with open_regular(target) as fh:
                size = os.fstat(fh.fileno()).st_size
        except InvalidArgument as exc:
            if exc.rule != "no such file":
                raise
            extent.update(path=str(target), present=False, complete=False)
            return
        header, complete = None, True
    extent.update(path=str(target), present=True)
    if extent["type"] in ("FLAT", "VMFS"):
        complete = size >= extent["offset"] + extent["size_bytes"]
    elif extent["type"] == "SPARSE":
        if header is None:
            header, _text, complete = _sparse_extent_info(target)
        if header.capacity_sectors * SECTOR != extent["size_bytes"]:
            raise _fail(target, f"header says the capacity is {header.capacity_sectors * SECTOR} "
                                f"bytes but the descriptor's extent says {extent['size_bytes']}")
    extent["complete"] = complete


def parse_vmdk(path: Path) -> dict:
    """Metadata of a VMDK (descriptor file or sparse extent), reading headers only."""
    path = Path(path)
    with open_regular(path) as fh:
        head = fh.read(SECTOR)
    magic = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
    header: SparseHeader | None = None
    embedded: Embedded | None = None
    if magic == COWD_MAGIC:
        raise InvalidArgument(str(path), "vmfsSparse (COWD) extents are not supported")
    if magic == SPARSE_MAGIC:
        header, text, complete = _sparse_extent_info(path)
        embedded = (path, header, complete)
        if text is None:
            raise InvalidArgument(str(path), "a sparse extent without an embedded descriptor: "
                                             "open its descriptor file instead")
    else:
        text = _read_text_descriptor(path)
    desc = parse_descriptor(path, text)
    values = desc["values"]
    extents = desc["extents"]
    for extent in extents:
        _check_extent(path, extent, embedded, _is_self(extent, extents, path))
    parent_cid = values.get("parentCID", NO_PARENT_CID).lower()
    parent = None
    if parent_cid != NO_PARENT_CID:
        parent = {"cid": parent_cid, "file_name_hint": values.get("parentFileNameHint")}
    hw = values.get("ddb.virtualHWVersion")
    return {
        "path": str(path),
        "capacity_bytes": sum(e["size_bytes"] for e in extents),
        "create_type": values["createType"],
        "adapter_type": values.get("ddb.adapterType"),
        "extents": extents,
        "hw_version": int(hw) if hw and hw.isdigit() else None,
        "cid": values.get("CID", "").lower() or None,
        "parent": parent,
        "stream_optimized": bool(header and header.stream_optimized),
        "grain_size_bytes": header.grain_sectors * SECTOR if header else None,
        "complete": all(e["present"] and e["complete"] for e in extents),
    }


def external_files(path: Path) -> list[str]:
    """The files a VMDK names besides itself (its extents), from its descriptor alone;
    [] for a single-file VMDK or a file that is not a VMDK at all."""
    path = Path(path)
    with open_regular(path) as fh:
        head = fh.read(SECTOR)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == SPARSE_MAGIC:
        _header, text, _complete = _sparse_extent_info(path)
        if text is None:
            return []
    else:
        try:
            text = _read_text_descriptor(path)
        except InvalidArgument:
            return []  # not a descriptor: qemu-img will say what it is
    embedded = len(head) >= 4 and struct.unpack_from("<I", head)[0] == SPARSE_MAGIC
    extents = parse_descriptor(path, text)["extents"]
    return [_extent_path(path, e["file"]).name for e in extents
            if e["type"] != "ZERO" and not (embedded and _is_self(e, extents, path))]


def _is_self(extent: dict, extents: list[dict], path: Path) -> bool:
    """Whether a sparse file's descriptor `extent` is that file itself, whatever name the
    descriptor records (an export renames the file; qemu-img ignores the name too)."""
    sparse = [e for e in extents if e["type"] == "SPARSE"]
    return extent["type"] == "SPARSE" and (len(sparse) == 1
                                           or Path(extent["file"]).name == path.name)
