"""GCS is the real emulator (gcp-storage-emulator); Compute Engine and Cloud Build are
`FakeComputeServer` (fake_compute.py)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from .fake_compute import BUCKET, FakeComputeServer, free_port


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> str:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("gcs")
    binary = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(binary), "-d", str(data_dir), "start", "--port", str(port),
                             "-H", "127.0.0.1", "-q", "--default-bucket", BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("gcp-storage-emulator did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def fake_compute(gcs_emulator):
    server = FakeComputeServer(gcs_endpoint=gcs_emulator)
    runner = web.AppRunner(server.app())
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()
