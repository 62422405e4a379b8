"""Jobs that have left the bus: a finished job stays a D-Bus object only for
daemon.finished_job_linger, then the screens read its record, log and retry through the
Manager by id (HyperClient.recent_jobs, stored_job, stored_log, retry_stored).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..client import ClientError

if TYPE_CHECKING:
    from .base import HyperScreen

RECENT = 500  # stored jobs the jobs screen shows besides those on the bus


def retry(screen: "HyperScreen", job_id: str) -> None:
    """Retry through the job's object while it is on the bus (the app's action, which
    also follows the new job), else through the Manager by id."""
    app = screen.hyper_app
    if job_id in app.client.mirror.jobs:
        app.retry_job(job_id)
        return

    async def by_id() -> None:
        try:
            new_id = await app.client.retry_stored(job_id)
        except ClientError as exc:
            app.report_error(exc)
            return
        app.notify(f"{job_id} retried as {new_id}")

    screen.run_worker(by_id(), group="actions")
