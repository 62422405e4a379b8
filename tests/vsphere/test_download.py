"""The streamed download against a real aiohttp file server, with injected faults."""
from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import threading
import time

import pytest
from aiohttp import web

from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.disks.download import download, redact_url
from hypersdk.service.job_output import StoreCheckpoints
from hypersdk.service.store import JobRecord, Store

from ..support.direct_io import fake_refusing_o_direct
from ..support.pagecache import cached_bytes
from ..support.wait import until
from .fault_proxy import FaultInjectingProxy, GatedProxy

SIZE = 3 * 1024 * 1024 + 123
CHUNK = 256 * 1024


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
    while True:  # ~1.6 MB/s: the first 256 KiB buffer lands within moments
        await response.write(b"x" * 16384)
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
               expected: int | None = SIZE, checkpoints: StoreCheckpoints | None = None):
    return await download(f"http://127.0.0.1:{port}{path}", target,
                          expected_size=expected, chunk_size=CHUNK,
                          max_retries=retries, on_bytes=rec.on_bytes, log=rec.log,
                          checkpoints=checkpoints)


async def test_download_streams_hashes_and_renames(server, payload, out):
    rec = Recorder()
    result = await _get(server, "/files/disk.bin", out / "disk.bin", rec)
    assert result.size == SIZE and result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == payload[0].read_bytes()
    assert rec.bytes == SIZE
    assert os.listdir(out) == ["disk.bin"]


def _files_app(directory) -> web.Application:
    """An app serving the files of `directory` under /files."""
    app = web.Application()
    app.router.add_static("/files", directory)
    return app


async def _download_big(serve, tmp_path, out, size: int):
    (tmp_path / "big.bin").write_bytes(os.urandom(size))
    port = await serve(_files_app(tmp_path))
    return await download(f"http://127.0.0.1:{port}/files/big.bin",
                          out / "big.bin", expected_size=size, chunk_size=2 << 20,
                          max_retries=0, on_bytes=lambda n: None, log=lambda *a: None)


async def test_download_writes_past_the_page_cache(serve, tmp_path, out):
    """The file is written with O_DIRECT: none of it sits in the page cache afterwards
    (buffered writes would leave all of it there), yet every byte, including the
    unaligned tail, is right."""
    size = (32 << 20) + 1234
    result = await _download_big(serve, tmp_path, out, size)
    assert result.size == size
    assert cached_bytes(out / "big.bin") < size // 8
    assert (out / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


async def test_download_without_o_direct_fake_filesystem(serve, tmp_path, out, monkeypatch):
    """A filesystem that refuses O_DIRECT (faked: open with the flag fails with EINVAL,
    as on such filesystems) gets ordinary writes, byte-identical."""
    fake_refusing_o_direct(monkeypatch)
    size = (8 << 20) + 77
    result = await _download_big(serve, tmp_path, out, size)
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
    assert any("sent the whole file again" in line for line in rec.lines)
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
    await until(lambda: rec.bytes or task.done(), what="the first bytes")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(out) == []


def test_redact_url_hides_signatures_and_credentials():
    assert redact_url("https://u:pw@h:8443/a/b?sig=SECRET&x=1") == \
        "https://u:<redacted>@h:8443/a/b?sig=<redacted>&x=1"


# --- servers built per test: redirects, TLS, a full disk, 503s, a stall, chunked ------------


@pytest.fixture
async def serve():
    """Start aiohttp apps on loopback ports; `await serve(app, ssl_context=None,
    host="127.0.0.1")` -> port."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None,
                    host: str = "127.0.0.1") -> int:
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, host, 0, ssl_context=ssl_context).start()
        runners.append(runner)
        return runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


def _recording_file(data: bytes, seen: list[dict]):
    """A handler that serves `data` (Range-aware via web.Response is not needed here)
    and records the headers of every request it gets."""
    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=data)
    return handler


def _redirect(status: int, location: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})
    return handler


SECRET_HEADERS = {"Cookie": "vmware_soap_session=SESSION", "Authorization": "Basic dTpwdw=="}


async def _fetch(url: str, target, rec: Recorder, *, expected: int | None, retries: int = 3,
                 **kwargs):
    return await download(url, target, expected_size=expected, chunk_size=CHUNK,
                          max_retries=retries, on_bytes=rec.on_bytes, log=rec.log, **kwargs)


async def test_redirect_same_host_keeps_the_cookie(serve, payload, out):
    data = payload[0].read_bytes()
    seen: list[dict] = []
    app = web.Application()
    app.router.add_get("/moved", _redirect(302, "/final/disk.bin"))
    app.router.add_get("/final/disk.bin", _recording_file(data, seen))
    port = await serve(app)
    rec = Recorder()
    result = await _fetch(f"http://127.0.0.1:{port}/moved", out / "disk.bin", rec,
                          expected=SIZE, headers=SECRET_HEADERS)
    assert result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == data
    assert len(seen) == 1 and seen[0].get("Cookie") == SECRET_HEADERS["Cookie"]
    assert seen[0].get("Authorization") == SECRET_HEADERS["Authorization"]


async def test_redirect_to_another_server_drops_cookie_and_authorization(serve, payload, out):
    data = payload[0].read_bytes()
    seen_first: list[dict] = []
    seen_other: list[dict] = []
    other = web.Application()
    other.router.add_get("/blob", _recording_file(data, seen_other))
    other_port = await serve(other)

    async def first_hop(request: web.Request) -> web.Response:
        seen_first.append(dict(request.headers))
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}/blob")

    app = web.Application()
    app.router.add_get("/disk.bin", first_hop)
    port = await serve(app)
    assert port != other_port
    result = await _fetch(f"http://127.0.0.1:{port}/disk.bin", out / "disk.bin", Recorder(),
                          expected=SIZE, headers=SECRET_HEADERS)
    assert result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == data
    # the first server got the secrets (so the test would notice them being dropped early)
    assert seen_first[0].get("Cookie") == SECRET_HEADERS["Cookie"]
    assert len(seen_other) == 1
    lowered = {name.lower() for name in seen_other[0]}
    assert "cookie" not in lowered and "authorization" not in lowered


def _chain_app(data: bytes) -> web.Application:
    """/chain/N redirects to /chain/N-1 ... /chain/0 serves `data`."""
    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=data)
        raise web.HTTPFound(f"/chain/{n - 1}")

    app = web.Application()
    app.router.add_get("/chain/{n}", chain)
    return app


async def test_five_redirects_are_followed(serve, payload, out):
    port = await serve(_chain_app(payload[0].read_bytes()))
    result = await _fetch(f"http://127.0.0.1:{port}/chain/5", out / "d", Recorder(),
                          expected=SIZE)
    assert result.sha256 == payload[1]


async def test_six_redirects_fail_and_leave_nothing(serve, payload, out):
    port = await serve(_chain_app(payload[0].read_bytes()))
    rec = Recorder()
    with pytest.raises(Failed, match="more than 5 redirects"):
        await _fetch(f"http://127.0.0.1:{port}/chain/6", out / "d", rec, expected=SIZE)
    assert os.listdir(out) == []
    assert not any("retry" in line for line in rec.lines)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl command line): (cert, key) paths."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def tls_port(serve, payload, self_signed):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed)
    return await serve(_files_app(payload[0].parent), ssl_context=context)


async def test_untrusted_certificate_fails_at_once_without_retries(tls_port, out):
    rec = Recorder()
    with pytest.raises(Failed, match="certificate is not trusted"):
        await _fetch(f"https://127.0.0.1:{tls_port}/files/disk.bin", out / "d", rec,
                     expected=SIZE, retries=3, ssl=None)
    assert not any("retry" in line for line in rec.lines)  # each retry would say so
    assert os.listdir(out) == []


async def test_trusted_certificate_downloads_byte_identical(tls_port, payload, self_signed, out):
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(self_signed[0]))
    rec = Recorder()
    result = await _fetch(f"https://127.0.0.1:{tls_port}/files/disk.bin", out / "disk.bin",
                          rec, expected=SIZE, ssl=context)
    assert result.size == SIZE and result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == payload[0].read_bytes()
    assert rec.bytes == SIZE


async def test_full_disk_fails_without_retry_and_leaves_nothing(serve, tmp_path, small_disk):
    size = 16 << 20
    (tmp_path / "big.bin").write_bytes(os.urandom(size))
    port = await serve(_files_app(tmp_path))
    rec = Recorder()
    with pytest.raises(Failed, match="writing big.bin failed: No space left on device"):
        await _fetch(f"http://127.0.0.1:{port}/files/big.bin", small_disk / "big.bin", rec,
                     expected=size, retries=3)
    assert not any("retry" in line for line in rec.lines)
    assert os.listdir(small_disk) == []


async def test_503_twice_then_served_is_retried(serve, payload, out):
    data = payload[0].read_bytes()
    answers: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        if len(answers) < 2:
            answers.append(503)
            return web.Response(status=503, text="busy")
        answers.append(200)
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/disk.bin", flaky)
    port = await serve(app)
    rec = Recorder()
    result = await _fetch(f"http://127.0.0.1:{port}/disk.bin", out / "disk.bin", rec,
                          expected=SIZE, retries=3)
    assert answers == [503, 503, 200]
    assert result.sha256 == payload[1]
    assert (out / "disk.bin").read_bytes() == data
    retries = [line for line in rec.lines if "retry" in line]
    assert len(retries) == 2 and "503" in retries[0]
    assert os.listdir(out) == ["disk.bin"]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_cancel_while_the_server_stalls_in_the_body(serve, out, self_signed, scheme):
    """The blocked body read is woken by the socket shutdown, also under TLS."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(SIZE)})
        await response.prepare(request)
        await response.write(b"x" * CHUNK)  # the client's first chunk, and no more
        await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/stall", stall)
    server_context = client_context = None
    if scheme == "https":
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(*self_signed)
        client_context = ssl.create_default_context(cafile=str(self_signed[0]))
    port = await serve(app, ssl_context=server_context)
    rec = Recorder()
    task = asyncio.ensure_future(_fetch(f"{scheme}://127.0.0.1:{port}/stall", out / "d", rec,
                                        expected=SIZE, read_timeout=30, ssl=client_context))
    try:
        # the first chunk written: the client is reading the next one, which never comes
        await until(lambda: rec.bytes == CHUNK or task.done(), what="the first chunk")
        assert not task.done()
        task.cancel()
        # well within the read timeout: the read was woken, not timed out
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the cancelled download still waits for the stalled server"
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    assert os.listdir(out) == []
    assert rec.bytes == CHUNK


async def test_chunked_response_without_content_length(serve, out):
    size = 1_000_003  # not a multiple of 4096: an unaligned tail
    data = os.urandom(size)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        assert response.chunked and response.content_length is None
        for start in range(0, size, 70_001):
            await response.write(data[start:start + 70_001])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/disk.bin", chunked)
    port = await serve(app)
    rec = Recorder()
    result = await _fetch(f"http://127.0.0.1:{port}/disk.bin", out / "disk.bin", rec,
                          expected=None)
    assert result.size == size
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (out / "disk.bin").read_bytes() == data
    assert rec.bytes == size


def _busy_writer_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name in ("download-hash", "download-write")]


async def test_second_cancel_still_waits_for_the_writer_threads(serve, tmp_path, out):
    """A task can be cancelled twice (a job cancelled while its timeout fires). The
    download must still end only after its writer threads have stopped: download()
    closes the descriptor when it ends, and a writer thread still writing would then
    write into whatever file reuses that descriptor number next (seen: 16 MiB of the
    disk landed in an unrelated file opened right after the cancelled task ended)."""
    size = 32 << 20
    (tmp_path / "big.bin").write_bytes(os.urandom(size))
    port = await serve(_files_app(tmp_path))
    for _ in range(3):  # the writer is usually still busy; three tries make it near certain
        first_bytes = asyncio.Event()
        task = asyncio.ensure_future(download(
            f"http://127.0.0.1:{port}/files/big.bin", out / "big.bin", expected_size=size,
            chunk_size=8 << 20, max_retries=0, on_bytes=lambda _n: first_bytes.set(),
            log=Recorder().log))
        alive_at_end: list[list[str]] = []
        task.add_done_callback(lambda _task: alive_at_end.append(_busy_writer_threads()))
        await asyncio.wait_for(first_bytes.wait(), 20)
        task.cancel()
        await asyncio.sleep(0)  # the task is now waiting for its thread to stop
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert alive_at_end == [[]]
        # let a leaked thread finish before the next try
        await until(lambda: not _busy_writer_threads(), what="the writer threads to stop")
        assert os.listdir(out) == []


async def test_ipv6_loopback_url(serve, tmp_path, out):
    """An IPv6 literal host ([::1]) is connected to as such (http.client, left to parse
    "::1" itself, would take the last group for a port)."""
    data = os.urandom(300_000)
    (tmp_path / "v6.bin").write_bytes(data)
    port = await serve(_files_app(tmp_path), host="::1")
    result = await _fetch(f"http://[::1]:{port}/files/v6.bin", out / "v6.bin", Recorder(),
                          expected=len(data), retries=0)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (out / "v6.bin").read_bytes() == data


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http:///nohost", "http://h:port/x"])
async def test_unusable_url_is_a_clear_error(out, url):
    with pytest.raises(Failed, match="not a usable http\\(s\\) URL"):
        await download(url, out / "x", expected_size=None, chunk_size=1 << 16, max_retries=3,
                       on_bytes=lambda n: None, log=lambda *a: None)
    assert os.listdir(out) == []


async def test_a_url_with_characters_outside_ascii(serve, tmp_path, out):
    """A path with non-ASCII characters (a VM named in French, say) is sent escaped, as
    a browser would; an already escaped path is left alone."""
    data = os.urandom(100_000)
    (tmp_path / "disque-été.bin").write_bytes(data)
    port = await serve(_files_app(tmp_path))
    for name in ("disque-été.bin", "disque-%C3%A9t%C3%A9.bin"):
        result = await _fetch(f"http://127.0.0.1:{port}/files/{name}", out / "d.bin",
                              Recorder(), expected=len(data), retries=0)
        assert result.sha256 == hashlib.sha256(data).hexdigest()


# --- resuming what an interrupted job left (disks/resume.py) ---------------------------------


@pytest.fixture
async def checkpoints(tmp_path):
    """A job's checkpoints in a real store, one every buffer."""
    store = Store(tmp_path / "state" / "hypersdk.db")
    await store.insert_job(JobRecord(id="job-1", kind="export", status="running", definition={}))
    yield StoreCheckpoints(store, "job-1", CHUNK, store.soon)
    await store.close()


async def _interrupt(port: int, path: str, target, checkpoints, hold_at: int) -> int:
    """Download through a proxy that holds the body at `hold_at`; once the checkpoints
    have caught up, cancel (as a stop of the service would). Returns the last checkpoint."""
    proxy = await GatedProxy("127.0.0.1", port, hold_at=hold_at).start()
    task = asyncio.ensure_future(_get(proxy.port, path, target, Recorder(),
                                      checkpoints=checkpoints))
    least = (hold_at - 4096) // CHUNK * CHUNK
    try:
        await asyncio.wait_for(proxy.holding.wait(), 20)
        await until(lambda: (saved := checkpoints.saved(target.name)) is not None
                    and saved.checkpoints[-1].offset >= least, 20, "the checkpoints")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        proxy.release.set()
        await proxy.close()
    return checkpoints.saved(target.name).checkpoints[-1].offset


async def _resume(port: int, path: str, target, checkpoints) -> tuple:
    """Download again through a proxy that counts what the server sends."""
    proxy = await FaultInjectingProxy("127.0.0.1", port).start()
    rec = Recorder()
    try:
        result = await _get(proxy.port, path, target, rec, checkpoints=checkpoints)
    finally:
        await proxy.close()
    return result, rec, proxy.served["files"]


async def test_an_interrupted_download_resumes_after_its_last_verified_checkpoint(
        server, payload, out, checkpoints):
    data = payload[0].read_bytes()
    last = await _interrupt(server, "/files/disk.bin", out / "disk.bin", checkpoints,
                            hold_at=SIZE // 2)
    saved = checkpoints.saved("disk.bin")
    assert [point.offset for point in saved.checkpoints] == list(range(CHUNK, last + 1, CHUNK))
    for point in saved.checkpoints:  # each the hash of all the bytes before it
        assert point.sha256 == hashlib.sha256(data[:point.offset]).hexdigest()
    assert os.listdir(out) == [saved.temp_name]  # kept for the resume
    assert saved.validator  # aiohttp's static files have an ETag

    result, rec, fetched = await _resume(server, "/files/disk.bin", out / "disk.bin",
                                         checkpoints)
    assert result.sha256 == payload[1] and (out / "disk.bin").read_bytes() == data
    assert any(f"resuming at byte {last} " in line for line in rec.lines), rec.lines
    assert SIZE - last <= fetched <= SIZE - last + 1024  # the rest, and one HTTP head
    assert rec.bytes == SIZE  # progress counts the verified bytes too
    assert os.listdir(out) == ["disk.bin"]
    assert checkpoints.saved("disk.bin").checkpoints[-1].final


async def test_a_partial_file_changed_since_is_cut_at_the_last_checkpoint_that_matches(
        server, payload, out, checkpoints):
    last = await _interrupt(server, "/files/disk.bin", out / "disk.bin", checkpoints,
                            hold_at=4 * CHUNK + 5000)
    assert last >= 3 * CHUNK
    partial = out / checkpoints.saved("disk.bin").temp_name
    with open(partial, "r+b") as handle:  # one byte inside the second checkpoint's part
        handle.seek(CHUNK + 17)
        byte = handle.read(1)
        handle.seek(CHUNK + 17)
        handle.write(bytes([byte[0] ^ 0xFF]))

    result, rec, fetched = await _resume(server, "/files/disk.bin", out / "disk.bin",
                                         checkpoints)
    assert result.sha256 == payload[1]
    assert any(f"resuming at byte {CHUNK} " in line for line in rec.lines), rec.lines
    assert SIZE - CHUNK <= fetched <= SIZE - CHUNK + 1024


async def test_a_source_file_changed_since_is_downloaded_whole(server, payload, out,
                                                              checkpoints):
    await _interrupt(server, "/files/disk.bin", out / "disk.bin", checkpoints,
                     hold_at=SIZE // 2)
    changed = os.urandom(SIZE)  # the source is another file now (its ETag changes)
    payload[0].write_bytes(changed)
    os.utime(payload[0], ns=(time.time_ns() + 10**9,) * 2)

    result, rec, fetched = await _resume(server, "/files/disk.bin", out / "disk.bin",
                                         checkpoints)
    assert result.sha256 == hashlib.sha256(changed).hexdigest()
    assert (out / "disk.bin").read_bytes() == changed
    # aiohttp honours If-Range with dates only: the ETag of its 206 tells the change
    assert any("the file on the server changed after byte" in line for line in rec.lines)
    assert rec.bytes == SIZE


async def test_a_complete_download_is_checked_not_fetched_again(server, payload, out,
                                                                checkpoints):
    first, _, _ = await _resume(server, "/files/disk.bin", out / "disk.bin", checkpoints)
    result, rec, fetched = await _resume(server, "/files/disk.bin", out / "disk.bin",
                                         checkpoints)
    assert fetched == 0
    assert result.sha256 == first.sha256 == payload[1]
    assert any("already complete" in line for line in rec.lines), rec.lines


async def test_without_a_validator_an_interrupted_download_starts_again(server, payload, out,
                                                                       checkpoints):
    """The server names no version of the file (no ETag, no Last-Modified): going on
    could join two different files, so the download starts from byte 0."""
    await _interrupt(server, "/norange/disk.bin", out / "disk.bin", checkpoints,
                     hold_at=SIZE // 2)
    assert checkpoints.saved("disk.bin").validator == ""
    proxy = await FaultInjectingProxy("127.0.0.1", server).start()
    rec = Recorder()
    try:
        result = await _get(proxy.port, "/norange/disk.bin", out / "disk.bin", rec,
                            checkpoints=checkpoints)
    finally:
        await proxy.close()
    assert result.sha256 == payload[1]
    assert any("named no version of the file" in line for line in rec.lines), rec.lines
    assert proxy.served["norange"] >= SIZE
    assert os.listdir(out) == ["disk.bin"]


async def test_a_kept_file_replaced_by_a_link_fails_the_resume_naming_why(server, out, tmp_path,
                                                                          checkpoints):
    """The partial file is a symlink now: it is not followed, and the download fails
    saying the kept file cannot be used (no traceback, nothing written through it)."""
    await _interrupt(server, "/files/disk.bin", out / "disk.bin", checkpoints, hold_at=SIZE // 2)
    partial = out / checkpoints.saved("disk.bin").temp_name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours")
    partial.unlink()
    partial.symlink_to(elsewhere)
    with pytest.raises(Failed, match=r"download .*disk\.bin: the file kept for a resume cannot "
                                     r"be used \(Too many levels of symbolic links\)"):
        await _get(server, "/files/disk.bin", out / "disk.bin", Recorder(),
                   checkpoints=checkpoints)
    assert elsewhere.read_bytes() == b"not yours"
