"""StreamConversions fed by real downloads from a loopback HTTP server (no vSphere):
a restarted download falls back, and at most MAX_STREAMS disks convert at once."""
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from hypersdk.service.confine import open_dir
from hypersdk.service.jobs import overlap
from hypersdk.service.disks.download import download
from hypersdk.service.model import DiskInfo
from tests.support.wait import until
from tests.vsphere.fake_context import FakeJobContext
from tests.vsphere.fault_proxy import FaultInjectingProxy, GatedProxy

from .conftest import stream_optimized_vmdk

MiB = 1 << 20
CAPACITY = 8 * MiB


@pytest.fixture
def disk_file(tmp_path):
    return stream_optimized_vmdk(tmp_path, "disk", CAPACITY)


@pytest.fixture
async def server(disk_file):
    """Serves the VMDK at /disk, always whole: it ignores Range requests."""
    data = disk_file[0].read_bytes()

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/disk", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


def streams(tmp_path: Path) -> tuple[overlap.StreamConversions, FakeJobContext, Path]:
    ctx = FakeJobContext({}, None, None)
    staging = tmp_path / "staging"
    staging.mkdir()
    conversions = overlap.StreamConversions(ctx)
    conversions.enable(ctx.staging(open_dir(tmp_path, "out", "out", create=True)), "qcow2", False)
    return conversions, ctx, staging


async def fetch(conversions, port: int, staging: Path, key: str) -> overlap.DiskFeed:
    disk = DiskInfo(key=key, label=key, capacity_bytes=CAPACITY)
    target = staging / f"{key}.vmdk"
    feed = conversions.begin(disk, target)
    await download(f"http://127.0.0.1:{port}/disk", target, expected_size=None,
                   chunk_size=256 << 10, max_retries=2, on_bytes=feed.on_bytes,
                   on_temp=feed.on_temp, log=lambda *args: None)
    feed.done()
    return feed


def same_image(a: Path, b: Path) -> bool:
    """(Staging paths are /proc/self/fd/N/... links, which only this process can follow.)"""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return subprocess.run(["qemu-img", "compare", "-q", a, b]).returncode == 0


async def test_a_download_converts_as_it_arrives(tmp_path, server, disk_file):
    conversions, ctx, staging = streams(tmp_path)
    try:
        await fetch(conversions, server, staging, "d1")
        images = await conversions.results()
        assert same_image(disk_file[1], images["d1"].path)
    finally:
        await conversions.close()
    assert not images["d1"].path.exists()  # nobody took it: close() removed it
    assert ctx.total == ctx.done == CAPACITY


async def test_a_download_that_restarts_from_zero_is_left_to_the_sequential_way(
        tmp_path, server, disk_file):
    proxy = await FaultInjectingProxy("127.0.0.1", server,
                                      cut_after=disk_file[0].stat().st_size // 2).start()
    conversions, ctx, staging = streams(tmp_path)
    try:
        feed = await fetch(conversions, proxy.port, staging, "d1")
        images = await conversions.results()
    finally:
        await conversions.close()
        await proxy.close()
    assert proxy.cuts_done == 1 and feed.dropped and images == {}
    assert "d1: not converting it while it downloads (its download restarted from byte 0)" \
        in ctx.text()
    # what the conversion had advanced is taken back; its share of the total stays for
    # the sequential conversion, which the hand-off does not count again
    assert ctx.done == 0 and ctx.total == CAPACITY * len(conversions.counted)
    ctx.fail()
    assert not (tmp_path / "out").exists()  # the job made it, and took it away again
    assert (staging / "d1.vmdk").read_bytes() == disk_file[0].read_bytes()


async def test_at_most_max_streams_disks_convert_at_once(tmp_path, server, disk_file):
    proxy = await GatedProxy("127.0.0.1", server, hold_at=disk_file[0].stat().st_size // 2).start()
    conversions, ctx, staging = streams(tmp_path)
    keys = [f"d{i}" for i in range(overlap.MAX_STREAMS + 1)]
    try:
        fetches = [asyncio.ensure_future(fetch(conversions, proxy.port, staging, key))
                   for key in keys]
        await until(lambda: len(conversions.feeds) == len(keys) and all(
            f.link or f.dropped for f in conversions.feeds.values()), what="every feed placed")
        assert conversions.running() == overlap.MAX_STREAMS
        proxy.release.set()
        await asyncio.gather(*fetches)
        images = await conversions.results()
        assert len(images) == overlap.MAX_STREAMS
        for image in images.values():
            assert same_image(disk_file[1], image.path)
    finally:
        proxy.release.set()
        await conversions.close()
        await proxy.close()
    assert "converting already); converting it after the download" in ctx.text()
