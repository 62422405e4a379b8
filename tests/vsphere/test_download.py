"""The streamed download against a real aiohttp file server, with injected faults."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import subprocess

import pytest
from aiohttp import web

from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.pipeline.download import download, redact_url

from .fault_proxy import FaultInjectingProxy

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture
def payload(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(SIZE)
    (src / "disk.bin").write_bytes(data)
    return src / "disk.bin", hashlib.sha256(data).hexdigest()


async def _slow(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": str(SIZE)})
    await response.prepare(request)
    while True:
        await response.write(b"x" * 1024)
        await asyncio.sleep(0.01)


DATA_KEY = web.AppKey("data", bytes)


async def _ignores_range(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DATA_KEY])


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
async def server(payload):
    app = web.Application()
    app[DATA_KEY] = payload[0].read_bytes()
    app.router.add_get("/slow", _slow)
    app.router.add_get("/norange/disk.bin", _ignores_range)
    app.router.add_static("/files", payload[0].parent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port
    await runner.cleanup()


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bytes = 0

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append(message)

    def on_bytes(self, n: int) -> None:
        self.bytes += n


async def _get(port: int, path: str, target, rec: Recorder, *, retries: int = 3,
               expected: int | None = SIZE):
    return await download(f"http://127.0.0.1:{port}{path}", target,
                          expected_size=expected, chunk_size=256 * 1024,
                          max_retries=retries, on_bytes=rec.on_bytes, log=rec.log)


async def test_download_streams_hashes_and_renames(server, payload, out):
    rec = Recorder()
    result = await _get(server, "/files/disk.bin", out / "disk.bin", rec)
    assert result.size == SIZE and result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == payload[0].read_bytes()
    assert rec.bytes == SIZE
    assert os.listdir(out) == ["disk.bin"]


def _cached_bytes(path) -> int:
    """How much of the file sits in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.strip())


async def _serve_file(directory):
    app = web.Application()
    app.router.add_static("/files", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def _download_big(tmp_path, out, size: int):
    (tmp_path / "big.bin").write_bytes(os.urandom(size))
    runner = await _serve_file(tmp_path)
    try:
        return await download(f"http://127.0.0.1:{runner.addresses[0][1]}/files/big.bin",
                              out / "big.bin", expected_size=size, chunk_size=2 << 20,
                              max_retries=0, on_bytes=lambda n: None, log=lambda *a: None)
    finally:
        await runner.cleanup()


async def test_download_writes_past_the_page_cache(tmp_path, out):
    """The file is written with O_DIRECT: none of it sits in the page cache afterwards
    (buffered writes would leave all of it there), yet every byte, including the
    unaligned tail, is right."""
    size = (32 << 20) + 1234
    result = await _download_big(tmp_path, out, size)
    assert result.size == size
    assert _cached_bytes(out / "big.bin") < size // 8
    assert (out / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


async def test_download_without_o_direct_fake_filesystem(tmp_path, out, monkeypatch):
    """A filesystem that refuses O_DIRECT (faked: open with the flag fails with EINVAL,
    as on such filesystems) gets ordinary writes, byte-identical."""
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    size = (8 << 20) + 77
    result = await _download_big(tmp_path, out, size)
    monkeypatch.undo()
    assert result.size == size
    assert result.sha256 == hashlib.sha256((tmp_path / "big.bin").read_bytes()).hexdigest()
    assert (out / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


async def test_dropped_connection_resumes_byte_identical(server, payload, out):
    proxy = await FaultInjectingProxy("127.0.0.1", server, cut_after=700_000, cuts=2).start()
    rec = Recorder()
    try:
        result = await _get(proxy.port, "/files/disk.bin", out / "disk.bin", rec)
    finally:
        await proxy.close()
    assert proxy.cuts_done == 2
    assert result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == payload[0].read_bytes()
    resumed = [line for line in rec.lines if "resumed at byte" in line]
    assert len(resumed) == 2 and not resumed[0].endswith("byte 0")
    assert rec.bytes == SIZE


async def test_server_ignoring_range_restarts_from_zero(server, payload, out):
    proxy = await FaultInjectingProxy("127.0.0.1", server, cut_after=500_000, cuts=1).start()
    rec = Recorder()
    try:
        result = await _get(proxy.port, "/norange/disk.bin", out / "disk.bin", rec)
    finally:
        await proxy.close()
    assert result.sha256 == payload[1]
    assert any("ignored the Range request" in line for line in rec.lines)
    assert rec.bytes == SIZE


async def test_too_many_drops_fail_and_leave_nothing(server, out):
    proxy = await FaultInjectingProxy("127.0.0.1", server, cut_after=300_000, cuts=None).start()
    rec = Recorder()
    try:
        with pytest.raises(Failed, match=r"after 3 attempts \(export.max_retries is 2\)"):
            await _get(proxy.port, "/files/disk.bin", out / "disk.bin", rec, retries=2)
    finally:
        await proxy.close()
    assert os.listdir(out) == []


async def test_wrong_size_is_refused(server, out):
    with pytest.raises(Failed, match=f"ends before byte {SIZE}, shorter than expected"):
        await _get(server, "/files/disk.bin", out / "d", Recorder(), expected=SIZE + 1)
    assert os.listdir(out) == []


async def test_missing_file_is_not_found(server, out):
    with pytest.raises(NotFound, match="HTTP 404"):
        await _get(server, "/files/nope.bin", out / "d", Recorder())
    assert os.listdir(out) == []


async def test_cancel_removes_temp_file(server, out):
    rec = Recorder()
    task = asyncio.ensure_future(_get(server, "/slow", out / "d", rec))
    while rec.bytes == 0 and not task.done():
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(out) == []


def test_redact_url_drops_query_and_credentials():
    assert redact_url("https://u:pw@h:8443/a/b?sig=SECRET&x=1") == "https://h:8443/a/b"
