"""Test servers on ports the kernel picks: nothing is chosen, released and hoped for.

An in-process aiohttp app binds port 0 and reads its port back; a server program is
started with port 0 and its port is read from the kernel's table of listening sockets
(/proc/net/tcp) for the sockets the process holds, as `ss -ltnp` would show.
"""
from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

from aiohttp import web

from .wait import wait_until

TCP_LISTEN = "0A"


async def serve_app(app: web.Application,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """`app` on a loopback port of its own; (runner to clean up, the port)."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner, runner.addresses[0][1]


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on (IPv4 loopback or any), if any yet."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == TCP_LISTEN and f"socket:[{inode}]" in inodes:
            return int(local.rsplit(":", 1)[1], 16)
    return None


def start_on_any_port(command: list[str], what: str, timeout: float = 30,
                      env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start a server program told to listen on port 0; (process, the port it took)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def port() -> int | None:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        return listening_port(process.pid)

    try:
        return process, wait_until(port, timeout, f"{what} to listen")
    except BaseException:
        process.kill()
        process.wait()
        raise
