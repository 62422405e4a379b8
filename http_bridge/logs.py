"""`GET /jobs/logs/{id}`: a job's log as text lines, streamed; `?follow=true` stays open.

Lines come from Manager.GetJobLog in pages, so memory stays flat whatever the log's
size (by job id: a finished job leaves the bus after daemon.finished_job_linger, its
log stays). While following, LogLine and status signals only wake the stream up; it
then asks GetJobLog for the lines after the last one it sent, so a burst of lines costs one
round trip and nothing is missed or sent twice. The stream ends when the job has
finished and every line is out (or when hypervisord goes away, said in a last line);
whether it has finished is the mirror's word, else the store's (Manager.GetJob).
"""
from __future__ import annotations

import asyncio

from aiohttp import web
from dbus_fast import Variant

from hypersdk.client.names import FINISHED, MANAGER_IFACE, MANAGER_PATH, job_path
from hypersdk.client.objects import ObjectEvent

from .errors import ApiError, invalid
from .handlers import call, job_props
from .keys import MIRROR, STOPPING
from .views import rfc3339

PAGE = 1000
IDLE_WAKE_SECONDS = 15.0


def parse_bool(text: str, field: str) -> bool:
    lowered = text.lower()
    if lowered in ("", "0", "false", "no"):
        return False
    if lowered in ("1", "true", "yes"):
        return True
    raise invalid(field, "expected true or false")


def format_line(line: list) -> str:
    _line_id, usec, level, message = line
    return f"{rfc3339(usec)} {level.upper()} {message}\n"


async def _get(request: web.Request, job_id: str, after: int) -> list:
    (lines,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "GetJobLog", "sta{sv}",
                          [job_id, after, {"limit": Variant("u", PAGE)}])
    return lines


async def _send(response: web.StreamResponse, lines: list, last: int) -> int:
    if not lines:
        return last
    await response.write("".join(format_line(line) for line in lines).encode())
    return lines[-1][0]


async def _drain(response: web.StreamResponse, request: web.Request, job_id: str,
                 last: int) -> int:
    """Send every line after `last`, a page at a time; return the last id sent."""
    while True:
        lines = await _get(request, job_id, last)
        last = await _send(response, lines, last)
        if len(lines) < PAGE:
            return last


async def job_logs(request: web.Request) -> web.StreamResponse:
    mirror = request.app[MIRROR]
    job_id = (await job_props(request, request.match_info["id"], "id"))["Id"]
    path = job_path(job_id)
    follow = parse_bool(request.query.get("follow", ""), "follow")
    wake = asyncio.Event()

    def listener(event: ObjectEvent) -> None:
        if event.path == path or event.type == "health":
            wake.set()

    mirror.subscribe(listener)
    response: web.StreamResponse | None = None
    try:
        lines = await _get(request, job_id, 0)  # before the answer starts: errors stay JSON
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        last = await _send(response, lines, 0)
        if len(lines) == PAGE:
            last = await _drain(response, request, job_id, last)
        while follow and not request.app[STOPPING].is_set():
            # the store's record when it is not mirrored: it left the bus, or the mirror
            # has not seen a job submitted a moment ago yet
            finished = (await job_props(request, job_id, "id")).get("Status") in FINISHED
            wake.clear()
            last = await _drain(response, request, job_id, last)
            if finished or not mirror.healthy:
                break
            await _wait(wake, request.app[STOPPING])
    except ApiError as exc:
        if response is None:
            raise
        await response.write(f"# log stream ended: {exc.message}\n".encode())
    except ConnectionResetError:  # the client went away; nothing left to tell it
        return response
    finally:
        mirror.unsubscribe(listener)
    await response.write_eof()
    return response


async def _wait(wake: asyncio.Event, stopping: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=IDLE_WAKE_SECONDS,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
