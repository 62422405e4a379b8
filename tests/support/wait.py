"""The one way tests wait: until something holds, or fail saying what never happened.

The deadline bounds a wait, it is never a measurement: tests assert on what happened,
not on how long it took.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
POLL = 0.05


def wait_for_value(read: Callable[[], T], accept: Callable[[T], Any], timeout: float = 20,
                   what: str = "a condition") -> T:
    """read() until accept(value); returns that value. On timeout the error shows the
    last value read."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last seen: {value!r})")
        time.sleep(POLL)


def wait_until(condition: Callable[[], T], timeout: float = 20, what: str = "a condition") -> T:
    """condition() until it is truthy; returns its value."""
    return wait_for_value(condition, bool, timeout, what)


async def until(condition: Callable[[], T], timeout: float = 20, what: str = "a condition",
                pause: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> T:
    """wait_until for a test running on an event loop (`pause`: e.g. a Textual pilot's)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pause(POLL)


async def pilot_until(pilot, condition: Callable[[], T], timeout: float = 20,
                      what: str = "a condition") -> T:
    """until() in a Textual app test: the pilot's pause lets the app process its messages."""
    return await until(condition, timeout, what, pause=pilot.pause)
