"""What an export must undo or restore whatever happens, and how it is sure to happen.

An export makes things in the cloud as it goes (a snapshot, a SAS grant, an image, an
export directory on a Hyper-V host) and may stop the VM. Each is registered in a
`Cleanups` list as it is made; when the export's block ends — completed, failed or
cancelled — every step runs, newest first, in one task shielded from cancellation: a
job cancelled again while they run does not stop them (the caller sees the
cancellation at once, the steps still finish), and a step that fails is logged and does
not stop the others. A step may also run early and leave the list (`run_early`: the VM
restarted as soon as the snapshots hold its disks).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from ..model import ExportSink

Step = Callable[[], Awaitable[Any]]
T = TypeVar("T")


async def run_to_completion(cleanup: Coroutine[Any, Any, Any]) -> Any:
    """Await `cleanup`; a cancellation of the caller does not stop it."""
    task = asyncio.ensure_future(cleanup)
    return await asyncio.shield(task)


async def undone_if_cancelled(making: Awaitable[T], undo: Callable[[T], Awaitable[Any]]) -> T:
    """Await `making` (a call that creates something in the cloud). If the caller is
    cancelled while it is out, it still ends, and what it made is undone (`undo` of its
    result, run to completion) before the cancellation goes on: a thread finishing a
    create call after its caller was cancelled would otherwise leave it unknown. `undo`
    may also hand what was made to the `Cleanups` the cancellation is about to run."""
    task = asyncio.ensure_future(making)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await run_to_completion(_undo_result(task, undo))
        raise


async def recorded_even_if_cancelled(making: Awaitable[T], record: Callable[[T], Any]) -> T:
    """Await `making` (a create call) and pass its result to `record`, which puts it on
    the list the export's cleanups undo. A cancel while the call is out still records it
    (`undone_if_cancelled`), before the cleanups run."""
    async def record_late(made: T) -> None:
        record(made)

    made = await undone_if_cancelled(making, record_late)
    record(made)
    return made


async def _undo_result(task: "asyncio.Future[T]", undo: Callable[[T], Awaitable[Any]]) -> None:
    try:
        made = await task
    except Exception:
        return  # it made nothing
    await undo(made)


class Cleanups:
    """`async with Cleanups(sink) as cleanups:` then `cleanups.add(what, step)` as things
    are made; see the module docstring."""

    def __init__(self, sink: ExportSink) -> None:
        self._sink = sink
        self._steps: list[tuple[str, Step]] = []

    def add(self, what: str, step: Step) -> None:
        """`what` names the step in the log ("starting VM web01 again")."""
        self._steps.append((what, step))

    async def run_early(self, what: str) -> None:
        """Run the step named `what` now, if it is registered, and drop it from the list."""
        for index, (name, step) in enumerate(self._steps):
            if name == what:
                del self._steps[index]
                await run_to_completion(self._run([(name, step)]))
                return

    async def __aenter__(self) -> "Cleanups":
        return self

    async def __aexit__(self, *_exc_info) -> None:
        steps, self._steps = self._steps[::-1], []
        if steps:
            await run_to_completion(self._run(steps))

    async def _run(self, steps: list[tuple[str, Step]]) -> None:
        for what, step in steps:
            try:
                await step()
            except Exception as exc:  # the others must still run; the export's own error wins
                self._sink.log(f"{what} failed: {exc}", "warning")
