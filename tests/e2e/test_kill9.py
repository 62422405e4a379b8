"""`kill -9` of hypervisord in the middle of an export, at seeded points: after each restart
the job is failed and says why, nothing it made is visible (only its private staging
directory with the checkpointed downloads stays), and its retry resumes the downloads after
their last verified checkpoint — fetching only the rest — and completes with disks equal to
the VM's.

The points are byte offsets into the disks' downloads, where a proxy in front of the
simulator holds every transfer while hypervisord is killed; with "disk+convert" the
export also converts the disks to qcow2 while they download (their streamOptimized
VMDKs of incompressible data make that run alongside), so the kill lands in the
conversion too. HYPERSDK_KILL_SEED=<n> repeats a run's points; the seed is printed.
(The import stage: tests/pipeline_kvm/test_kill_import.py.)
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.support.filesystems import fill, mounted_tmpfs
from tests.support.cli import (BUS_NAME, MANAGER, MANAGER_IFACE, busctl, busctl_json,
                               job_property, submit, wait_for_status)
from tests.support.hypervisord import Hypervisord
from tests.support.images import same_image
from tests.support.staging import assert_only_private_staging_left
from tests.support.wait import until
from tests.vcsim.harness import give_disks
from tests.vsphere.fault_proxy import GatedProxy

from .conftest import EXPORT_VM

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("HYPERSDK_KILL_SEED", "20261207"))
POINTS = 10
MiB = 1 << 20
KiB = 1 << 10
DISKS = [16 * MiB, 8 * MiB]
CHUNK = 64 * KiB  # buffers and checkpoints: one every buffer


async def test_kill9_at_seeded_points_of_an_export_leaves_nothing_and_the_retry_completes(
        start_hypervisord, system_bus, sim, si, service_dir):
    rng = random.Random(SEED)
    print(f"kill points seeded with {SEED} (HYPERSDK_KILL_SEED={SEED} repeats them)")
    uploads = service_dir / "uploads"
    uploads.mkdir()
    disks = await asyncio.to_thread(give_disks, sim, si, EXPORT_VM, DISKS, uploads,
                                    subformat="streamOptimized", noise=True)
    smallest = min(disk.local_vmdk.stat().st_size for disk in disks)  # sparse: < capacity
    for point in range(POINTS):
        offset = rng.randrange(256 << 10, smallest - (64 << 10))  # inside every download
        method = rng.choice(["disk", "ovf", "disk+convert"])
        print(f"point {point}: kill at byte {offset} of each download, export_method {method}")
        await _kill_during_export_then_retry(start_hypervisord, system_bus.address, sim,
                                             service_dir, disks, point, offset, method)


async def _kill_during_export_then_retry(start_hypervisord, address: str, sim, service_dir,
                                         disks, point: int, offset: int, method: str) -> None:
    exports = service_dir / "exports"
    export_path = exports / f"run{point}"
    held = await HeldExport.start(start_hypervisord, address, sim, service_dir, offset, method,
                                  export_path, len(disks))
    restarted = Hypervisord(held.daemon.config_path, address)
    try:
        await asyncio.to_thread(held.daemon.kill)
        kept = held.kept()
        held.proxy.release.set()  # the next connections pass freely
        await asyncio.to_thread(restarted.start)

        assert job_property(address, held.path, "Status") == "failed"
        error = job_property(address, held.path, "Error")
        assert error.startswith("interrupted: hypervisord stopped while the job was running")
        assert f"{kept} verified bytes of its downloads are kept" in error
        assert_only_private_staging_left(export_path)
        converted = service_dir / "kvm" / EXPORT_VM  # hyper2kvm.output_dir/<vm>
        assert not converted.exists(), list(converted.iterdir())

        held.proxy.served.clear()
        retried = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "RetryJob",
                              "sa{sv}", held.job_id, "0")["data"][0]
        await _assert_resumed(address, retried, held, disks, export_path, kept, point)
        assert not list(exports.rglob(".hypersdk-staging-*"))
        if method.endswith("+convert"):
            _assert_converted(address, retried, disks)
            shutil.rmtree(converted)  # the next point converts the same VM
    finally:
        await asyncio.to_thread(restarted.stop)
        await held.proxy.close()


async def test_a_stop_keeps_checkpointed_downloads_and_resume_on_start_resumes_them(
        start_hypervisord, system_bus, sim, si, service_dir):
    """SIGTERM (a `systemctl restart`) mid-download: the job fails "interrupted by service
    shutdown" keeping its downloads, and with export.resume_on_start the next start
    retries it at once, fetching only the rest."""
    address = system_bus.address
    disks, export_path, held = await _hold_an_export(start_hypervisord, address, sim, si,
                                                     service_dir,
                                                     service_dir / "exports" / "stopped")
    try:
        assert await asyncio.to_thread(held.daemon.stop) == 0
        kept = held.kept()
        held.proxy.release.set()
        held.proxy.served.clear()
        await asyncio.to_thread(start_hypervisord, providers=held.providers,
                                export={**held.export, "resume_on_start": True})
        error = job_property(address, held.path, "Error")
        assert error == ("interrupted by service shutdown; its finished files were removed; "
                         f"{kept} verified bytes of its downloads are kept, and retrying the "
                         "job resumes after them")
        retried = _the_retry_of(address, held.job_id)
        await _assert_resumed(address, retried, held, disks, export_path, kept, 0)
    finally:
        await held.proxy.close()


async def test_downloads_kept_for_a_resume_go_with_the_job_record(
        start_hypervisord, system_bus, sim, si, service_dir):
    """Nobody retries the interrupted job: when retention prunes its record, the data it
    kept goes too (and the export directory it made, now empty)."""
    address = system_bus.address
    _disks, export_path, held = await _hold_an_export(start_hypervisord, address, sim, si,
                                                      service_dir,
                                                      service_dir / "exports" / "abandoned")
    try:
        await asyncio.to_thread(held.daemon.kill)
        held.proxy.release.set()
        await asyncio.to_thread(start_hypervisord, providers=held.providers,
                                export=held.export, database={"retention_count": 1})
        assert_only_private_staging_left(export_path)
        other = json.loads((await asyncio.to_thread(
            submit, address, {"steps": 1, "interval": 0}, "sleep")).stdout.split()[1])
        await asyncio.to_thread(wait_for_status, address, other, {"completed"})
        assert not export_path.exists()
        missing = busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetJob",
                         "sa{sv}", held.job_id, "0", check=False)
        assert missing.stderr == f"Call failed: no job '{held.job_id}'\n"
    finally:
        await held.proxy.close()


async def test_a_full_output_filesystem_fails_the_export_truthfully_and_leaves_nothing(
        start_hypervisord, system_bus, sim, si, service_dir):
    """The export directory's real filesystem (a tmpfs) fills up while a disk downloads:
    the job fails naming the cause, nothing of it stays there, and once there is room
    again its retry completes."""
    address = system_bus.address
    with mounted_tmpfs(service_dir / "exports" / "small", "32m") as small:
        disks, export_path, held = await _hold_an_export(start_hypervisord, address, sim, si,
                                                         service_dir, small / "run")
        try:
            filler = fill(small, leave=256 * KiB)
            held.proxy.release.set()
            assert await asyncio.to_thread(wait_for_status, address, held.path,
                                           {"completed", "failed"}, 60) == "failed"
            error = job_property(address, held.path, "Error")
            assert "failed: No space left on device" in error, error
            assert [entry.name for entry in small.iterdir()] == ["filler"]
            filler.unlink()
            retried = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                                  "RetryJob", "sa{sv}", held.job_id, "0")["data"][0]
            assert await asyncio.to_thread(wait_for_status, address, retried,
                                           {"completed", "failed"}, 60) == "completed"
            for index, disk in enumerate(disks, 1):
                assert same_image(export_path / f"{EXPORT_VM}-disk{index}.vmdk",
                                  disk.local_vmdk)
        finally:
            await asyncio.to_thread(held.daemon.stop)
            await held.proxy.close()


async def _hold_an_export(start_hypervisord, address: str, sim, si, service_dir,
                          export_path: Path):
    """The VM's new disks, and an export of them to `export_path` held at 1 MiB."""
    uploads = service_dir / "uploads"
    uploads.mkdir()
    disks = await asyncio.to_thread(give_disks, sim, si, EXPORT_VM, DISKS, uploads)
    held = await HeldExport.start(start_hypervisord, address, sim, service_dir, MiB, "disk",
                                  export_path, len(disks))
    return disks, export_path, held


class HeldExport:
    """An export through a proxy that holds each download at byte `offset`, once every
    full buffer before it is checkpointed in the store."""

    def __init__(self, proxy: GatedProxy, daemon: Hypervisord, providers: dict, export: dict,
                 store, path: str, job_id: str) -> None:
        self.proxy, self.daemon, self.providers, self.export = proxy, daemon, providers, export
        self.store, self.path, self.job_id = store, path, job_id

    @classmethod
    async def start(cls, start_hypervisord, address: str, sim, service_dir, offset: int,
                    method: str, export_path, downloads: int) -> "HeldExport":
        """`method`: an export_method, or "disk+convert" (with the built-in conversion)."""
        proxy = await GatedProxy(sim.host, sim.port, hold_at=offset).start()
        providers = {"vsphere": sim.provider_settings(port=proxy.port)}
        export = {"chunk_size": CHUNK, "checkpoint_interval": CHUNK}
        daemon = await asyncio.to_thread(start_hypervisord, providers=providers, export=export)
        export_method, _, then = method.partition("+")
        definition = {"vm_identifier": EXPORT_VM, "provider": "vsphere",
                      "export_method": export_method, "export_path": str(export_path),
                      "options": {"shutdown_vm": False}}
        if then == "convert":
            definition["hyper2kvm_integration"] = {"enabled": True, "auto_convert": True,
                                                   "format": "qcow2"}
        path = json.loads((await asyncio.to_thread(submit, address, definition))
                          .stdout.split()[1])
        held = cls(proxy, daemon, providers, export, service_dir / "state" / "hypersdk.db",
                   path, job_property(address, path, "Id"))
        await asyncio.wait_for(proxy.holding.wait(), 60)
        # every full buffer below the held byte is checkpointed (the HTTP head < 4 KiB)
        least = (offset - 4 * KiB) // CHUNK * CHUNK
        await until(lambda: _all_beyond(_checkpointed(held.store, held.job_id), downloads,
                                        least), 60, f"checkpoints at byte {least}")
        return held

    def kept(self) -> int:
        """The bytes the store's checkpoints vouch for (read once the service is gone)."""
        return sum(_checkpointed(self.store, self.job_id))


async def _assert_resumed(address: str, retried: str, held: HeldExport, disks, export_path,
                          kept: int, point: int) -> None:
    """The retry completes with the VM's disks, fetching only what was not kept."""
    status = await asyncio.to_thread(wait_for_status, address, retried,
                                     {"completed", "failed"}, 120)
    assert status == "completed", job_property(address, retried, "Error")
    for index, disk in enumerate(disks, 1):
        assert same_image(export_path / f"{EXPORT_VM}-disk{index}.vmdk", disk.local_vmdk)
    full = sum(disk.local_vmdk.stat().st_size for disk in disks)
    fetched = held.proxy.served["folder"]
    print(f"point {point}: the retry fetched {fetched} of {full} bytes")
    assert full - kept <= fetched <= full - kept + 8 * KiB


def _assert_converted(address: str, job: str, disks) -> None:
    """Each of the VM's disks was converted, and compares equal with its source."""
    images = [Path(disk["path"]) for disk in
              json.loads(job_property(address, job, "Result"))["hyper2kvm"]["disks"]]
    assert len(images) == len(disks)
    for disk in disks:
        assert sum(same_image(image, disk.local_vmdk) for image in images) == 1


def _the_retry_of(address: str, job_id: str) -> str:
    paths = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ListJobs",
                        "a{sv}", "0")["data"][0]
    retries = [path for path in paths if job_property(address, path, "RetryOf") == job_id]
    assert len(retries) == 1, paths
    return retries[0]


def _checkpointed(store, job_id: str) -> list[int]:
    """The furthest checkpoint of each of the job's downloads, read from its store."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return [row[0] for row in db.execute(
            "SELECT MAX(offset) FROM download_checkpoints WHERE job_id=? GROUP BY target",
            (job_id,))]


def _all_beyond(offsets: list[int], count: int, least: int) -> bool:
    return len(offsets) == count and min(offsets) >= least
