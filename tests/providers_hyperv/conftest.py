"""`FakeWinRMServer` (fake_winrm.py) on 127.0.0.1, Basic auth over HTTP."""
from __future__ import annotations

import socket

import pytest
from aiohttp import web

from .fake_winrm import FakeWinRMServer

USER = "HV\\exporter"
PASSWORD = "s3cret-Passw0rd"


@pytest.fixture
async def fake_winrm():
    server = FakeWinRMServer(username=USER, password=PASSWORD)
    runner = web.AppRunner(server.app())
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"127.0.0.1:{port}"
    yield server
    await runner.cleanup()
