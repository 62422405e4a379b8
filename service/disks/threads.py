"""Blocking work in a thread, awaited so that cancelling never abandons the thread.

A plain `asyncio.to_thread` returns at cancellation while the thread goes on
writing; the caller would then remove or close files the thread still uses. Here
cancellation asks the work to stop and waits until the thread has really ended,
even when the awaiting task is cancelled again meanwhile (a job cancelled while
its own timeout fires); the CancelledError is raised after that.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


async def wait_for_thread(future: asyncio.Future, stop: Callable[[], None]) -> T:
    """The result of `future` (a thread's); on cancel call `stop()` and wait for the end."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop()
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                pass  # cancelled again: the thread still owns its files; re-raised below
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


async def run_stoppable(fn: Callable[[threading.Event], T]) -> T:
    """Run blocking `fn(stop)` in the default executor; on cancel set `stop` and wait."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, fn, stop)
    return await wait_for_thread(future, stop.set)


def from_any_thread(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` for blocking work's threads to call: each call runs fn(*args) on the event
    loop running now (call it from a coroutine), in the order of the calls."""
    loop = asyncio.get_running_loop()
    return lambda *args: loop.call_soon_threadsafe(fn, *args)


async def run_in_own_thread(fn: Callable[[], T], stop: Callable[[], None], name: str) -> T:
    """Run blocking `fn()` in a new thread called `name`; on cancel call `stop()` and wait.

    For work that must not take a thread of the default executor (a download that
    conversions, waiting in executor threads, follow: jobs/overlap.py).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: object, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await wait_for_thread(future, stop)
