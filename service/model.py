"""The domain model every layer shares: VMs, their disks and NICs, exported disks, export
options, and what a provider reports to while it exports.

Plain data with no behaviour beyond what describes it; providers fill it in, job kinds
and disk libraries read it, nothing here imports from those layers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class DiskInfo:
    key: str                 # stable id within the VM, e.g. "disk-2000"
    label: str
    capacity_bytes: int
    location: str = ""       # datastore path, volume id, blob URL ... (never a secret)
    controller: str = ""     # scsi | sata | ide | nvme | virtio | ""
    boot_order: int | None = None
    file_bytes: int | None = None  # size of the file behind it, when known


@dataclass
class NicInfo:
    key: str
    mac: str
    network: str
    adapter: str = ""        # vmxnet3, e1000, ena, ...


@dataclass
class VMInfo:
    identifier: str
    name: str
    provider: str
    power_state: str = "unknown"   # poweredOn | poweredOff | suspended | unknown
    path: str = ""
    uuid: str = ""
    guest_os: str = ""
    cpus: int = 1
    memory_mb: int = 0
    firmware: str = "bios"         # bios | uefi
    secure_boot: bool = False
    datacenter: str = ""
    tags: list[str] = field(default_factory=list)
    disks: list[DiskInfo] = field(default_factory=list)
    nics: list[NicInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["disk_bytes"] = sum(d.capacity_bytes for d in self.disks)
        return data


@dataclass
class ExportedDisk:
    path: Path               # the file inside the export directory
    format: str              # vmdk | raw | vhd | vhdx | qcow2
    capacity_bytes: int
    file_bytes: int
    sha256: str              # hex digest of the file's bytes
    boot_order: int | None = None
    label: str = ""
    key: str = ""


@dataclass
class ExportOptions:
    """The `options` of an export job, plus the limits from the config."""

    shutdown_vm: bool = False
    restore_power_state: bool = False
    remove_cdrom: bool = True
    compress: bool = False
    chunk_size: int = 10 * 1024 * 1024
    max_retries: int = 3
    parallel_disks: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # provider-specific options
    # takes disks while they download (jobs/overlap.py); a provider may ignore it
    stream_consumer: "StreamConsumer | None" = None
    # where downloads record how far they got, so a retry resumes (disks/resume.py)
    checkpoints: "DownloadCheckpoints | None" = None


class DiskFeed(Protocol):
    """One disk's download as a stream consumer follows it."""

    def on_bytes(self, nbytes: int) -> None: ...  # each count the download reports
    def done(self) -> None: ...                   # the file is complete under its final name
    def failed(self) -> None: ...


class StreamConsumer(Protocol):
    """Converts disks while they download. A provider that can offers it every disk it
    downloads whole into one file: `begin(disk, target)`, then the feed's calls."""

    def begin(self, disk: DiskInfo, target: Path) -> DiskFeed: ...


@dataclass(frozen=True)
class Checkpoint:
    """`offset` bytes of a download were on disk (fdatasync'd) and hashed to `sha256`
    (of the bytes [0, offset)); `final`: the download was complete at that point."""

    offset: int
    sha256: str
    final: bool = False


@dataclass(frozen=True)
class SavedDownload:
    """What an interrupted job left of one download: its file in the job's staging
    directory (`temp_name` while incomplete), the server's validator of the file (a
    strong ETag or its Last-Modified date: a resume asks for the rest only if the file
    is unchanged, with If-Range) and its checkpoints, oldest first."""

    temp_name: str
    validator: str
    checkpoints: list[Checkpoint]


class DownloadCheckpoints(Protocol):
    """Where downloads into one job's staging directory keep their checkpoints (the
    store, for a real job), by the name of the file they download to."""

    interval: int  # bytes between checkpoints

    def saved(self, target_name: str) -> SavedDownload | None: ...
    def save(self, target_name: str, temp_name: str, validator: str,
             point: Checkpoint) -> None: ...
    def clear(self, target_name: str) -> None: ...


class ExportSink(Protocol):
    """What a provider reports to while exporting (the job context implements it)."""

    def log(self, message: str, level: str = "info") -> None: ...
    def add_total(self, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
