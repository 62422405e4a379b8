"""Direct-pipeline exports convert streamOptimized disks while they download.

Real govmomi simulator, real export job (FakeJobContext as the engine), a loopback
proxy that holds the disk download back near its end: the conversion must have
written most of the image before the download's last bytes were even sent.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.providers import vsphere_export
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.images import sha256_file
from tests.support.wait import until
from tests.vcsim.harness import find_vm, give_disks
from tests.vsphere.fake_context import job_context, run_job
from tests.vsphere.fault_proxy import FaultInjectingProxy
from tests.vsphere.fake_nfc import FakeNfcLease

from tests.vsphere.fault_proxy import GatedProxy

from .conftest import make_config, stream_optimized_vmdk

VM = "DC0_H0_VM0"
MiB = 1 << 20
KIND = ExportKind()


def definition() -> dict:
    return {"vm_identifier": VM, "provider": "vsphere", "export_method": "disk",
            "export_path": "vm1", "options": {"shutdown_vm": False},
            "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                      "format": "qcow2"}}


def same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def put_stream_optimized(sim, si, tmp_path: Path, sizes: list[int]) -> list[tuple[Path, Path]]:
    """Give the VM disks of `sizes`; the first becomes a streamOptimized VMDK.
    Returns (uploaded file, raw content or the uploaded file) per disk."""
    work = tmp_path / "uploaded"
    work.mkdir()
    uploaded = give_disks(sim, si, VM, sizes, work)
    vmdk, raw = stream_optimized_vmdk(work, "streamed", sizes[0])
    sim.put_file(vmdk, uploaded[0].datastore_path, "DC0")
    return [(vmdk, raw)] + [(d.local_vmdk, d.local_vmdk) for d in uploaded[1:]]


def converted_bytes(out_dir: Path) -> int:
    """Bytes the conversion has written so far (into the job's staging directory there)."""
    if not out_dir.is_dir():
        return 0
    return sum(p.stat().st_blocks * 512 for p in out_dir.rglob("*") if p.is_file())


async def start_export(tmp_path: Path, sim, port: int):
    config = make_config(tmp_path, sim, port)
    registry = ProviderRegistry(config)
    ctx = job_context(KIND, definition(), config, registry)
    return asyncio.ensure_future(run_job(KIND, ctx)), ctx, registry


def leftovers(tmp_path: Path) -> list[str]:
    found = []
    for top in (tmp_path / "exports", tmp_path / "images"):
        if top.exists():
            found += [str(p) for p in top.rglob("*")]
    return found


async def test_conversion_runs_while_the_disk_downloads(tmp_path, sim, si):
    capacity = 32 * MiB
    [(vmdk, raw)] = put_stream_optimized(sim, si, tmp_path, [capacity])
    file_bytes = vmdk.stat().st_size
    proxy = await GatedProxy(sim.host, sim.port, hold_at=file_bytes * 3 // 4).start()
    task, ctx, registry = await start_export(tmp_path, sim, proxy.port)
    out_dir = tmp_path / "images" / VM
    try:
        await asyncio.wait_for(proxy.holding.wait(), 60)
        # the last quarter of the file is not sent yet: half the disk converted already
        await until(lambda: converted_bytes(out_dir) >= capacity // 4, 30,
                    "a quarter of the disk converted before the download ends")
        proxy.release.set()
        result = await asyncio.wait_for(task, 120)
    finally:
        proxy.release.set()
        await registry.close()
        await proxy.close()
    handoff = result["hyper2kvm"]
    assert handoff["mode"] == "builtin"
    [image] = handoff["disks"]
    assert Path(image["path"]).parent == out_dir and image["format"] == "qcow2"
    assert same_image(raw, Path(image["path"]))
    assert "converting to qcow2 while it downloads" in ctx.text()
    assert ctx.total == file_bytes + capacity and ctx.done == ctx.total
    assert os.listdir(out_dir) == [Path(image["path"]).name]
    assert not [p for p in (tmp_path / "exports" / "vm1").iterdir() if p.name.startswith(".")]


async def test_a_disk_that_is_not_stream_optimized_converts_after_the_download(tmp_path, sim,
                                                                               si):
    sizes = [8 * MiB, 4 * MiB]
    disks = put_stream_optimized(sim, si, tmp_path, sizes)
    task, ctx, registry = await start_export(tmp_path, sim, sim.port)
    try:
        result = await asyncio.wait_for(task, 120)
    finally:
        await registry.close()
    text = ctx.text()
    assert text.count("while it downloads") == 1
    assert "not a streamOptimized VMDK; converting it after the download" in text
    images = [Path(d["path"]) for d in result["hyper2kvm"]["disks"]]
    assert len(images) == 2 and all(p.suffix == ".qcow2" for p in images)
    for (_uploaded, content), image in zip(disks, images):
        assert same_image(content, image)
    exported = sum(d["bytes"] for d in result["disks"])
    assert ctx.total == exported + sum(sizes) and ctx.done == ctx.total


async def test_cancel_during_the_overlap_leaves_nothing(tmp_path, sim, si):
    capacity = 32 * MiB
    [(vmdk, _raw)] = put_stream_optimized(sim, si, tmp_path, [capacity])
    proxy = await GatedProxy(sim.host, sim.port, hold_at=vmdk.stat().st_size // 2).start()
    task, ctx, registry = await start_export(tmp_path, sim, proxy.port)
    out_dir = tmp_path / "images" / VM
    try:
        await asyncio.wait_for(proxy.holding.wait(), 60)
        await until(lambda: converted_bytes(out_dir) > 0, 30, "the first converted bytes")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        proxy.release.set()
        await registry.close()
        await proxy.close()
    assert leftovers(tmp_path) == []  # the export directory too: the job created it


async def test_the_conversion_follows_a_resumed_download(tmp_path, sim, si):
    capacity = 16 * MiB
    [(vmdk, raw)] = put_stream_optimized(sim, si, tmp_path, [capacity])
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=vmdk.stat().st_size // 3,
                                      cuts=2).start()
    task, ctx, registry = await start_export(tmp_path, sim, proxy.port)
    try:
        result = await asyncio.wait_for(task, 120)
    finally:
        await registry.close()
        await proxy.close()
    assert proxy.cuts_done == 2 and ctx.text().count("resumed at byte") == 2
    assert "while it downloads" in ctx.text()
    assert same_image(raw, Path(result["hyper2kvm"]["disks"][0]["path"]))
    assert ctx.done == ctx.total == vmdk.stat().st_size + capacity


async def test_a_failed_download_stops_its_conversion_and_leaves_nothing(tmp_path, sim, si):
    capacity = 16 * MiB
    [(vmdk, _raw)] = put_stream_optimized(sim, si, tmp_path, [capacity])
    # three attempts (export.max_retries is 2) of a fifth of the file each cannot finish it
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=vmdk.stat().st_size // 5,
                                      cuts=None).start()
    task, ctx, registry = await start_export(tmp_path, sim, proxy.port)
    try:
        with pytest.raises(Failed, match="failed after 3 attempts"):
            await asyncio.wait_for(task, 120)
    finally:
        await registry.close()
        await proxy.close()
    assert "while it downloads" in ctx.text()
    assert leftovers(tmp_path) == []  # the export directory too: the job created it


async def test_an_nfc_lease_export_as_ova_converts_while_downloading(tmp_path, sim, si,
                                                                     monkeypatch):
    """The lease path (real vSphere: its disks are streamOptimized), packaged as an OVA."""
    capacity = 16 * MiB
    [(vmdk, raw)] = put_stream_optimized(sim, si, tmp_path, [capacity])
    config = make_config(tmp_path, sim, sim.port)
    registry = ProviderRegistry(config)
    [disk] = [d for d in find_vm(si, VM).config.hardware.device if hasattr(d, "capacityInKB")]
    lease = FakeNfcLease([f"http://*:{sim.port}" + sim.datastore_url_path(
        disk.backing.fileName, "DC0")], sha256=[sha256_file(vmdk)])
    monkeypatch.setattr(vsphere_export, "open_export_lease", lambda si, identifier: lease)
    body = dict(definition(), export_method="ova")
    ctx = job_context(KIND, body, config, registry)
    try:
        result = await asyncio.wait_for(run_job(KIND, ctx), 120)
    finally:
        await registry.close()
    assert lease.calls[-1] == ("complete",)
    assert "converting to qcow2 while it downloads" in ctx.text()
    assert result["ova"] and same_image(raw, Path(result["hyper2kvm"]["disks"][0]["path"]))
    assert ctx.done == ctx.total
