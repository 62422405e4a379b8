"""The NFC export-lease path. The simulator has no ExportVm, so FakeNfcLease stands in
for the lease calls only; the disks are downloaded over real HTTP from the
simulator's datastore (through a slowing proxy, so the lease keep-alive runs)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.providers import vsphere_export
from hypersdk.service.model import ExportOptions
from tests.support.images import same_image, sha256_file
from tests.support.wait import until

from .fake_context import FakeJobContext, FakeSubmitContext, job_context, run_job
from .fault_proxy import FaultInjectingProxy
from .fake_nfc import FakeNfcLease
from .helpers import definition


def lease_urls(sim, uploaded, port: int) -> list[str]:
    """Device URLs as ESXi gives them, with '*' for the host."""
    return [f"http://*:{port}" + sim.datastore_url_path(d.datastore_path, "DC0") for d in uploaded]


async def run_with_lease(config, registry, lease, monkeypatch):
    monkeypatch.setattr(vsphere_export, "open_export_lease", lambda si, identifier: lease)
    kind = ExportKind()
    ctx = job_context(kind, definition(export_method="ovf"), config, registry)
    return await run_job(kind, ctx), ctx


async def test_lease_is_kept_alive_and_completed(config, registry, sim, uploaded, monkeypatch):
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=1 << 40, cuts=0,
                                      delay=0.05).start()
    digests = [sha256_file(d.local_vmdk) for d in uploaded]
    lease = FakeNfcLease(lease_urls(sim, uploaded, proxy.port), sha256=digests)
    try:
        result, ctx = await run_with_lease(config, registry, lease, monkeypatch)
    finally:
        await proxy.close()
    progress = [call[1] for call in lease.calls if call[0] == "progress"]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 100
    assert lease.calls[-1] == ("complete",) and ("abort",) not in lease.calls
    assert "export lease ready: 2 disk(s)" in ctx.text()
    assert ctx.text().count("checksum ok") == 2
    for disk, entry in zip(uploaded, result["disks"]):
        assert same_image(disk.local_vmdk, Path(entry["path"]))


async def test_checksum_mismatch_with_server_manifest_fails(config, registry, sim, uploaded,
                                                            monkeypatch, tmp_path):
    """Straight through the provider: the disks it had written are removed again."""
    lease = FakeNfcLease(lease_urls(sim, uploaded, sim.port), sha256=["00" * 32, "11" * 32])
    monkeypatch.setattr(vsphere_export, "open_export_lease", lambda si, identifier: lease)
    checked = ExportKind().validate(definition(), FakeSubmitContext(config, registry))
    staging = tmp_path / "staging"
    staging.mkdir()
    provider = await registry.get("vsphere")
    with pytest.raises(Failed, match=r"disk 1/2 .*differs from the server's manifest"):
        await provider.export_disks(checked["vm_identifier"], staging, ExportOptions(),
                                    FakeJobContext(checked, config, registry))
    assert os.listdir(staging) == []
    assert lease.calls[-1] == ("abort",) and ("complete",) not in lease.calls


async def test_lease_is_aborted_when_a_download_fails(config, registry, sim, uploaded,
                                                      monkeypatch):
    urls = lease_urls(sim, uploaded, sim.port)
    urls[1] = urls[1].replace(".vmdk", "-missing.vmdk")
    lease = FakeNfcLease(urls)
    with pytest.raises(NotFound, match="HTTP 404"):
        await run_with_lease(config, registry, lease, monkeypatch)
    assert lease.calls[-1] == ("abort",) and ("complete",) not in lease.calls
    assert not any(Path(config.export.base_path).iterdir())  # vm1 was the job's: gone


async def test_lease_is_aborted_on_cancel(config, registry, sim, uploaded, monkeypatch):
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=1 << 40, cuts=0,
                                      delay=0.05).start()
    lease = FakeNfcLease(lease_urls(sim, uploaded, proxy.port))
    task = asyncio.ensure_future(run_with_lease(config, registry, lease, monkeypatch))
    try:
        # the lease is ready and a disk is being written: the job made something to remove
        base = Path(config.export.base_path)
        await until(lambda: lease.polls >= 2 and any(p.is_file() for p in base.rglob("*")),
                    what="a disk being downloaded")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await proxy.close()
    assert lease.calls[-1] == ("abort",) and ("complete",) not in lease.calls
    assert not any(Path(config.export.base_path).iterdir())  # vm1 was the job's: gone
