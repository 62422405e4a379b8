"""The providers' one cleanup list: newest first, all of them, even when cancelled twice."""
from __future__ import annotations

import asyncio
import threading

import pytest

from hypersdk.service.providers.cleanup import Cleanups, undone_if_cancelled
from tests.support.fake_sink import FakeExportSink
from tests.support.wait import until


async def record(ran: list[str], name: str) -> None:
    ran.append(name)


async def test_steps_run_newest_first_and_the_exports_own_error_wins():
    ran: list[str] = []
    sink = FakeExportSink()

    async def step(name: str, fail: bool = False) -> None:
        ran.append(name)
        if fail:
            raise RuntimeError(f"{name} broke")

    with pytest.raises(ValueError, match="the export failed"):
        async with Cleanups(sink) as cleanups:
            cleanups.add("restart the VM", lambda: step("restart"))
            cleanups.add("delete the snapshot", lambda: step("delete", fail=True))
            cleanups.add("revoke the grant", lambda: step("revoke"))
            raise ValueError("the export failed")
    assert ran == ["revoke", "delete", "restart"]
    assert sink.lines == ["warning: delete the snapshot failed: delete broke"]


async def test_a_second_cancel_does_not_stop_the_cleanups():
    """The job is cancelled, and cancelled again while the VM is being started: the start
    and the steps after it still finish."""
    starting, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def slow_restart() -> None:
        starting.set()
        await release.wait()
        ran.append("restart")

    async def export() -> None:
        async with Cleanups(FakeExportSink()) as cleanups:
            cleanups.add("restart", slow_restart)
            cleanups.add("delete", lambda: record(ran, "delete"))
            downloading.set()
            await asyncio.Event().wait()  # the download, until cancelled

    downloading = asyncio.Event()
    task = asyncio.create_task(export())
    await asyncio.wait_for(downloading.wait(), 5)
    task.cancel()
    await asyncio.wait_for(starting.wait(), 5)
    task.cancel()  # again, while the cleanups run
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await until(lambda: ran == ["delete", "restart"], 5, "both steps after the second cancel")


async def test_a_step_run_early_leaves_the_list():
    ran: list[str] = []
    async with Cleanups(FakeExportSink()) as cleanups:
        cleanups.add("restart", lambda: record(ran, "restart"))
        await cleanups.run_early("restart")
        assert ran == ["restart"]
        await cleanups.run_early("nothing by that name")
    assert ran == ["restart"]


async def test_what_a_create_call_made_after_its_caller_was_cancelled_is_undone():
    """The create call (a blocking SDK call in a thread) is still out when the caller is
    cancelled: its result is awaited and undone before the cancellation goes on; a call
    that fails made nothing to undo."""
    for outcome in ("made", "failed"):
        release, undone = threading.Event(), []

        def create() -> str:
            release.wait(10)
            if outcome == "failed":
                raise RuntimeError("refused")
            return "snap-1"

        async def undo(made: str) -> None:
            undone.append(made)

        caller = asyncio.ensure_future(undone_if_cancelled(asyncio.to_thread(create), undo))
        await asyncio.sleep(0)  # the call is out
        caller.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert undone == (["snap-1"] if outcome == "made" else [])
