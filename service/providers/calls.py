"""How a provider calls its SDK: errors mapped through one hook, transient ones retried by
one policy, background work owned by one task owner.

- The error-mapping hook: each provider declares, in `Provider.map_error`, which of
  its SDK's exceptions mean which error of `service/errors.py` (401 → NotAuthorized,
  404 → NotFound, 429/5xx → Retryable, ...). Common code applies it: `Provider.call`
  and `Provider.guard`, `fetch_ranges`.
- `RetryPolicy`: how many times a transient failure is tried again and how long to wait
  in between (doubling, capped; a `Retryable(retry_after=...)` the server asked for
  wins). Which failures are transient is decided by the mapped error's class, so the
  hook decides it. Where an SDK retries on its own (botocore, azure-core) the policy
  gives it the number of retries instead.
- `TaskOwner`: tasks a provider starts for one piece of work (parallel disks, ranged
  readers, a lease keep-alive) are created through it, and when its block ends every
  task still running is cancelled and awaited, so nothing outlives the work that
  started it (cockpit's channel owns its tasks the same way).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from ..errors import HyperSDKError, Retryable

T = TypeVar("T")

MAX_RETRY_AFTER = 120.0  # a server's Retry-After longer than this is not waited out

MapError = Callable[[Exception], BaseException]
"""An SDK exception to the error a caller sees (the exception itself when it is not the SDK's)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` tries after the first; waits of `first_delay` s doubling up to `max_delay`;
    failures whose mapped error is one of `transient` are tried again."""

    retries: int
    first_delay: float = 0.5
    max_delay: float = 30.0
    transient: tuple[type[HyperSDKError], ...] = (Retryable,)

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, failures: int, error: BaseException) -> float:
        """Seconds to wait after the `failures`-th failure (1, 2, ...)."""
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            return min(float(asked), MAX_RETRY_AFTER)
        return min(self.first_delay * 2 ** (failures - 1), self.max_delay)


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy,
                       map_error: MapError,
                       on_retry: Callable[[BaseException, int], None] | None = None) -> T:
    """`await attempt()`, again while it fails transiently and the policy allows; the last
    failure is raised as its mapped error. `on_retry(error, failures)` before each wait."""
    failures = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            error = map_error(exc)
            if not isinstance(error, policy.transient) or failures >= policy.retries:
                if error is exc:
                    raise
                raise error from None
            failures += 1
            if on_retry is not None:
                on_retry(error, failures)
            await asyncio.sleep(policy.delay(failures, error))


class TaskOwner:
    """`async with TaskOwner() as tasks:` then `tasks.create_task(coro)`; see the module
    docstring. No task can be created once the owner is closed."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def create_task(self, coroutine: Coroutine[Any, Any, T]) -> "asyncio.Task[T]":
        if self._closed:
            coroutine.close()
            raise RuntimeError("the task owner is closed")
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel the tasks still running and wait until every one has ended."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> "TaskOwner":
        return self

    async def __aexit__(self, *_exc_info) -> None:
        await self.close()
