"""The one way tests wait: until something holds, or fail saying what never happened.

The deadline bounds a wait, it is never a measurement: tests assert on what happened,
not on how long it took. Between two looks the helper backs off (a few milliseconds at
first, at most POLL): the only place in the tests that sleeps.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import select
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
FIRST_PAUSE = 0.005
POLL = 0.05


def _pauses() -> Iterator[float]:
    """FIRST_PAUSE, doubling up to POLL: quick for what is nearly there, cheap for what is not."""
    pause = FIRST_PAUSE
    while True:
        yield pause
        pause = min(pause * 2, POLL)


def wait_for_value(read: Callable[[], T], accept: Callable[[T], Any], timeout: float = 20,
                   what: str = "a condition") -> T:
    """read() until accept(value); returns that value. On timeout the error shows the
    last value read."""
    deadline = time.monotonic() + timeout
    for pause in _pauses():
        value = read()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last seen: {value!r})")
        time.sleep(pause)


def wait_until(condition: Callable[[], T], timeout: float = 20, what: str = "a condition") -> T:
    """condition() until it is truthy; returns its value."""
    return wait_for_value(condition, bool, timeout, what)


async def until(condition: Callable[[], T | Awaitable[T]], timeout: float = 20,
                what: str = "a condition",
                pause: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> T:
    """wait_until for a test running on an event loop (`pause`: e.g. a Textual pilot's);
    a condition may be a coroutine function (one reading the store)."""
    deadline = time.monotonic() + timeout
    for seconds in _pauses():
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pause(seconds)


async def job_is(engine, job_id: str, condition: Callable[[Any], bool]) -> bool:
    """Whether the engine's job (engine.get: the store's record, or the live one) meets
    `condition`: for until()."""
    return condition(await engine.get(job_id))


async def pilot_until(pilot, condition: Callable[[], T], timeout: float = 20,
                      what: str = "a condition") -> T:
    """until() in a Textual app test: the pilot's pause lets the app process its messages."""
    return await until(condition, timeout, what, pause=pilot.pause)


def wait_exit(pid: int, timeout: float) -> tuple[int, float] | None:
    """(exit code, CPU seconds of its whole life) once child `pid` exits, None if it has
    not within `timeout`. Waits on the process's pidfd, which becomes readable at exit."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            return None
    finally:
        os.close(pidfd)
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
