"""FaultInjectingProxy: a loopback TCP proxy that cuts connections after N response bytes,
or refuses requests for some paths.

It sits between a client and a real server (the simulator, a small aiohttp
server) and forwards bytes both ways. When a connection has carried `cut_after`
bytes from the server to the client, it aborts that connection, which looks to
the client like a dropped link. It does that `cuts` times in all (always when
`cuts` is None); connections that stay below `cut_after` (small SOAP calls) pass.
`delay` slows the server-to-client direction down (seconds per 64 KiB read).

`served` counts the bytes sent to the client, by the first segment of the path of the
connection's first request ("folder" for datastore files, "sdk" for SOAP).

`refuse_paths`: a connection whose first request's path starts with one of these
prefixes (`/rest`, `/api`: the vAPI services) never reaches the server; the proxy
answers as `refusal` says (see REFUSALS): it resets the connection, answers 403 or
a proxy's 502 page, or never answers. The clients here open separate connections
for SOAP, datastore and vAPI requests, so the first request decides for a connection.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib

BAD_GATEWAY_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
REFUSALS: dict[str, bytes | None] = {
    "reset": None,  # the connection is closed without an answer
    "hang": b"",    # the request is read and never answered
    "forbidden": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "bad-gateway": (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(BAD_GATEWAY_PAGE), BAD_GATEWAY_PAGE)),
}


class FaultInjectingProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, cut_after: int | None = None,
                 cuts: int | None = 1, delay: float = 0.0, refuse_paths: tuple[str, ...] = (),
                 refusal: str = "reset") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.delay = delay
        self.refuse_paths = refuse_paths
        self.refusal = REFUSALS[refusal]
        self.connections = 0
        self.cuts_done = 0
        self.refused = 0
        self.served: collections.Counter[str] = collections.Counter()
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
        first_line = await client_r.readline()
        if self._refused(first_line):
            await self._refuse(client_r, client_w)
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        up_w.write(first_line)
        to_server = asyncio.ensure_future(self._pipe(client_r, up_w, None, ""))
        to_client = asyncio.ensure_future(self._pipe(up_r, client_w, self.cut_after,
                                                     _first_segment(first_line)))
        self._tasks.update((to_server, to_client))
        try:
            await asyncio.wait((to_server, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_server, to_client):
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, up_w):
                writer.close()

    def _refused(self, request_line: bytes) -> bool:
        path = _path_of(request_line)
        return any(path.startswith(prefix) for prefix in self.refuse_paths)

    async def _refuse(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.refused += 1
        if self.refusal is None:
            client_w.transport.abort()
            return
        if self.refusal:
            while (await client_r.readline()).strip():  # the request's headers: closing
                pass                                     # with them unread would reset
            client_w.write(self.refusal)
            await client_w.drain()
        else:
            while await client_r.read(65536):  # until the client gives up
                pass
        client_w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None, counted: str) -> None:
        """Forward; `limit` and `counted` only for the server-to-client direction."""
        sent = 0
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if limit is not None and sent + len(data) >= limit and self._take_cut():
                writer.write(data[: limit - sent])
                self.served[counted] += limit - sent
                await writer.drain()
                self.cuts_done += 1
                writer.transport.abort()
                return
            writer.write(data)
            if counted:
                self.served[counted] += len(data)
            await writer.drain()
            sent += len(data)
            if limit is not None and self.delay:
                await asyncio.sleep(self.delay)


class GatedProxy(FaultInjectingProxy):
    """A loopback proxy that holds every response back after `hold_at` bytes until
    `release` is set (`holding` is set once one is held). Small SOAP replies pass."""

    def __init__(self, upstream_host: str, upstream_port: int, hold_at: int) -> None:
        super().__init__(upstream_host, upstream_port, cut_after=hold_at, cuts=0)
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None, counted: str) -> None:
        sent = 0
        while data := await reader.read(65536):
            if limit is not None and sent < limit <= sent + len(data):
                writer.write(data[:limit - sent])
                self.served[counted] += limit - sent
                await writer.drain()
                self.holding.set()
                await self.release.wait()
                data, sent = data[limit - sent:], limit
            writer.write(data)
            if counted:
                self.served[counted] += len(data)
            await writer.drain()
            sent += len(data)


def _path_of(request_line: bytes) -> str:
    parts = request_line.split()
    return parts[1].decode("latin-1") if len(parts) > 1 else ""


def _first_segment(request_line: bytes) -> str:
    """"folder" for "GET /folder/vm/disk.vmdk?dcPath=... HTTP/1.1"."""
    return _path_of(request_line).lstrip("/").split("/", 1)[0].split("?", 1)[0]
