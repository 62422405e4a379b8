"""FaultInjectingProxy: a loopback TCP proxy that cuts connections after N response bytes.

It sits between a client and a real server (the simulator, a small aiohttp
server) and forwards bytes both ways. When a connection has carried `cut_after`
bytes from the server to the client, it aborts that connection, which looks to
the client like a dropped link. It does that `cuts` times in all (always when
`cuts` is None); connections that stay below `cut_after` (small SOAP calls) pass.
`delay` slows the server-to-client direction down (seconds per 64 KiB read).
"""
from __future__ import annotations

import asyncio
import contextlib


class FaultInjectingProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, cut_after: int,
                 cuts: int | None = 1, delay: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.delay = delay
        self.connections = 0
        self.cuts_done = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> "FaultInjectingProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def _take_cut(self) -> bool:
        if self.cuts_left is None:
            return True
        if self.cuts_left > 0:
            self.cuts_left -= 1
            return True
        return False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        to_server = asyncio.ensure_future(self._pipe(client_r, up_w, None))
        to_client = asyncio.ensure_future(self._pipe(up_r, client_w, self.cut_after))
        self._tasks.update((to_server, to_client))
        try:
            await asyncio.wait((to_server, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_server, to_client):
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, up_w):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None) -> None:
        sent = 0
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if limit is not None and sent + len(data) >= limit and self._take_cut():
                writer.write(data[: limit - sent])
                await writer.drain()
                self.cuts_done += 1
                writer.transport.abort()
                return
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if limit is not None and self.delay:
                await asyncio.sleep(self.delay)
