"""GCS is the real emulator (gcp-storage-emulator); Compute Engine and Cloud Build are
`FakeComputeServer` (fake_compute.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ..support.servers import serve_app, start_on_any_port
from .fake_compute import BUCKET, FakeComputeServer


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> str:
    data_dir = tmp_path_factory.mktemp("gcs")
    binary = Path(sys.executable).with_name("gcp-storage-emulator")
    proc, port = start_on_any_port([str(binary), "-d", str(data_dir), "start", "--port", "0",
                                    "-H", "127.0.0.1", "-q", "--default-bucket", BUCKET],
                                   "gcp-storage-emulator")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def fake_compute(gcs_emulator):
    server = FakeComputeServer(gcs_endpoint=gcs_emulator)
    runner, port = await serve_app(server.app())
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()
