"""Cleanup that must finish even when the export it follows is cancelled.

Revoking a SAS grant or deleting a snapshot we made runs in a `finally:` block. If
the job is cancelled again while that cleanup is awaiting the cloud, a plain await
would be interrupted and leave the grant or snapshot behind; shielded, the cleanup
task runs to its end while the caller sees the cancellation at once.
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine


async def run_to_completion(cleanup: Coroutine[Any, Any, Any]) -> Any:
    """Await `cleanup`; a cancellation of the caller does not stop it."""
    task = asyncio.ensure_future(cleanup)
    return await asyncio.shield(task)
