"""The bridge stops cleanly: open WebSockets get 1001 and log streams end."""
from __future__ import annotations

import asyncio
import signal
import subprocess

import aiohttp

from .conftest import submit_sleep
from .stack import ADMIN_TOKEN


async def test_sigterm_closes_websockets_and_log_streams(bridge, system_bus):
    job_id = await asyncio.to_thread(submit_sleep, system_bus.address, steps=300, interval=0.1)
    follow = subprocess.Popen(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
                               f"{bridge.url}/jobs/logs/{job_id}?follow=true"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = await asyncio.to_thread(follow.stdout.readline)  # the stream is open
    assert " step " in first_line, first_line
    async with aiohttp.ClientSession(headers=bridge.auth_headers) as session:
        async with session.ws_connect(bridge.url + "/websocket") as ws:
            bridge.process.send_signal(signal.SIGTERM)
            while (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert ws.close_code == 1001
            returncode = await asyncio.to_thread(bridge.process.wait, 15)
    assert returncode == 0, bridge.log()
    _rest, errors = await asyncio.to_thread(follow.communicate, timeout=10)
    assert follow.returncode == 0, errors  # a complete, cleanly ended stream
