"""vSphere's side of warm migration: Changed Block Tracking (`jobs/warm.py` drives it).

`open_warm_source` turns on `changeTrackingEnabled` (ReconfigVM) when it is off. Each
round then takes a snapshot (no memory, not quiesced), asks
`QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId)` — changeId "*" in
the first round, afterwards the change id the previous round's snapshot gave the disk
— and reads only those extents, with HTTP Range GETs on the disk's flat extent over the
datastore's /folder interface (while the snapshot exists the base disk does not
change: the VM writes into the snapshot's delta), one HTTP session per round.
Snapshots are found by name in the VM's snapshot tree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import aiohttp

from ..errors import Failed
from ..model import DiskInfo, ExportSink, VMInfo
from .vsphere_export import datastore_url, sibling_path
from .vsphere_session import SessionPool

EXTENT_RE = re.compile(r'^\s*(?:RW|RDONLY)\s+\d+\s+(FLAT|VMFS)\s+"([^"]+)"', re.MULTILINE)
DESCRIPTOR_LIMIT = 64 << 10


def _device_key(disk: DiskInfo) -> int:
    return int(disk.key.removeprefix("disk-"))


def _vm(si, identifier: str):
    from pyVmomi import vim

    return vim.VirtualMachine(identifier, si._stub)


def enable_change_tracking(si, identifier: str) -> bool:
    """Turn CBT on for the VM; whether it was off (blocking)."""
    from pyVmomi import vim

    from .vsphere import wait_task

    vm = _vm(si, identifier)
    if vm.config.changeTrackingEnabled:
        return False
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)),
              f"enabling changed block tracking on {identifier}")
    return True


def _create_snapshot(si, identifier: str, name: str) -> tuple[object, dict[int, tuple[str, str]]]:
    """The new snapshot and, per disk device key, its file name and change id (blocking)."""
    from pyVmomi import vim

    from .vsphere import wait_task

    task = _vm(si, identifier).CreateSnapshot_Task(
        name=name, description="hypersdk warm migration (removed after the round)",
        memory=False, quiesce=False)
    snapshot = wait_task(task, f"snapshot {name} of {identifier}")
    disks = {device.key: (device.backing.fileName, getattr(device.backing, "changeId", "") or "")
             for device in snapshot.config.hardware.device
             if isinstance(device, vim.vm.device.VirtualDisk)}
    return snapshot, disks


def _snapshot_tree(si, identifier: str) -> list:
    """The VM's snapshot tree (read by the property collector: the simulator's accessor
    fails on a VM without snapshots)."""
    from pyVmomi import vim, vmodl

    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=_vm(si, identifier))],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine,
                                                            pathSet=["snapshot"])])
    for content in si.content.propertyCollector.RetrieveContents([spec]) or []:
        for prop in content.propSet or []:
            if prop.name == "snapshot" and prop.val is not None:
                return list(prop.val.rootSnapshotList or [])
    return []


def _find_snapshots(trees: list, prefix: str) -> list[tuple[str, object]]:
    found = []
    for tree in trees:
        if tree.name.startswith(prefix):
            found.append((tree.name, tree.snapshot))
        found += _find_snapshots(list(tree.childSnapshotList or []), prefix)
    return found


def remove_snapshots_named(si, identifier: str, prefix: str) -> list[str]:
    """Remove every snapshot of the VM whose name starts with `prefix` (blocking); their
    names."""
    from .vsphere import wait_task

    from pyVmomi import vmodl

    removed = []
    for name, snapshot in _find_snapshots(_snapshot_tree(si, identifier), prefix):
        try:
            task = snapshot.RemoveSnapshot_Task(removeChildren=False)
        except vmodl.fault.ManagedObjectNotFound:
            continue  # removed meanwhile (a retry and the restart's clean-up both look)
        wait_task(task, f"removing snapshot {name}")
        removed.append(name)
    return removed


def query_changed_areas(si, identifier: str, snapshot, key: int, capacity: int,
                        since: str) -> list[tuple[int, int]]:
    """Every changed extent of disk `key` from offset 0 to its capacity (blocking): the
    server answers a piece of the disk per call."""
    vm = _vm(si, identifier)
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=key, startOffset=offset,
                                        changeId=since)
        extents += [(area.start, area.length) for area in info.changedArea or []]
        if info.length <= 0:
            break
        offset = info.startOffset + info.length
    return extents


@dataclass
class VSphereWarmSource:
    """A `WarmSource` (providers/base.py) for one vSphere VM."""

    pool: SessionPool
    vm: VMInfo
    sink: ExportSink
    shut_down_vm: object  # async () -> None: the provider's guest shutdown / power-off
    _snapshot: object = None
    _disks: dict[int, tuple[str, str]] = field(default_factory=dict)
    _extent_urls: dict[str, str] = field(default_factory=dict)  # descriptor path -> flat URL
    _session: aiohttp.ClientSession | None = None

    async def create_snapshot(self, name: str) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._snapshot, self._disks = await self.pool.run(_create_snapshot, self.vm.identifier,
                                                          name)

    async def changed_extents(self, disk: DiskInfo,
                              since: str | None) -> tuple[list[tuple[int, int]], str]:
        key = _device_key(disk)
        if key not in self._disks:
            raise Failed(f"the snapshot of {self.vm.name} has no disk {disk.label} ({disk.key})")
        change_id = self._disks[key][1]
        if not change_id:
            raise Failed(f"{self.vm.name}: {disk.label} has no change id in the snapshot: "
                         f"changed block tracking is not active on it")
        extents = await self.pool.run(query_changed_areas, self.vm.identifier, self._snapshot,
                                      key, disk.capacity_bytes, since or "*")
        return extents, change_id

    async def _http(self) -> tuple[aiohttp.ClientSession, dict]:
        if self._session is None:
            raise Failed("a warm migration read outside a round")
        cookie = await self.pool.run(SessionPool.cookie)
        return self._session, {"Cookie": cookie.split(";")[0]}

    async def _extent_url(self, disk: DiskInfo) -> str:
        """The URL of the flat file holding the disk's data, named by its descriptor."""
        location = self._disks[_device_key(disk)][0]
        if location in self._extent_urls:
            return self._extent_urls[location]
        session, headers = await self._http()
        url = datastore_url(self.pool, location, self.vm.datacenter)
        async with session.get(url, headers=headers, ssl=self.pool.ssl_context()) as response:
            if response.status != 200:
                raise Failed(f"reading the descriptor of {location}: HTTP {response.status}")
            text = (await response.content.read(DESCRIPTOR_LIMIT)).decode("utf-8", "replace")
        extents = EXTENT_RE.findall(text)
        if len(extents) != 1 or PurePosixPath(extents[0][1]).name != extents[0][1]:
            raise Failed(f"{location}: warm migration reads disks with one flat extent; this "
                         f"one has {len(extents)} (a sparse or split disk)")
        self._extent_urls[location] = datastore_url(
            self.pool, sibling_path(location, extents[0][1]), self.vm.datacenter)
        return self._extent_urls[location]

    async def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        url = await self._extent_url(disk)
        session, headers = await self._http()
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        async with session.get(url, headers=headers, ssl=self.pool.ssl_context(),
                               timeout=aiohttp.ClientTimeout(sock_read=self.pool.timeout)
                               ) as response:
            if response.status != 206:
                raise Failed(f"reading {length} bytes at {offset} of {disk.label}: HTTP "
                             f"{response.status} (the datastore must answer Range requests)")
            data = await response.read()
        if len(data) != length:
            raise Failed(f"reading {length} bytes at {offset} of {disk.label}: got {len(data)}")
        return data

    async def remove_snapshots(self, prefix: str, keep: frozenset[str] = frozenset()) -> None:
        """`keep` does not matter here: a change id of changed block tracking outlives
        the snapshot it was read from."""
        self._snapshot = None
        await self.close()
        for name in await self.pool.run(remove_snapshots_named, self.vm.identifier, prefix):
            self.sink.log(f"removed snapshot {name}")

    async def shut_down(self) -> None:
        await self.shut_down_vm()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
