"""Jobs that have left the bus: a finished job stays a D-Bus object only for
daemon.finished_job_linger, then the screens read its record, log and retry through the
Manager by id (ListJobRecords, GetJob, GetJobLog, RetryJob).

HyperClient follows the objects on the bus only, and its call_manager sends no options,
so the newest page is read with its _call; the shared client package should grow
job_records() and retry-by-id (see the report of issue 16's "Bounded" part).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbus_fast import Variant

from hypersdk.service.dbus.paths import BUS_NAME, MANAGER_PATH, job_id_from_path, job_path

from ..client import LOG_PAGE, MANAGER_IFACE, ClientError, JobState, LogLine

if TYPE_CHECKING:
    from .base import HyperScreen

RECENT = 500  # stored jobs the jobs screen shows besides those on the bus


def _state(record: dict[str, Any]) -> JobState:
    props = {name: getattr(value, "value", value) for name, value in record.items()}
    return JobState(job_path(props["Id"]), props)


async def recent_jobs(client, count: int = RECENT) -> dict[str, JobState]:
    """The newest `count` stored jobs (JobCounts says how many there are)."""
    stored = sum(client.mirror.job_counts.values())
    options = {"limit": Variant("u", count), "offset": Variant("t", max(0, stored - count))}
    records, _total = await client._call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                                         "ListJobRecords", "a{sv}", [options])
    return {job.id: job for job in map(_state, records)}


async def stored_job(client, job_id: str) -> JobState:
    return _state(await client.call_manager("GetJob", "s", job_id))


async def stored_log(client, job_id: str) -> list[LogLine]:
    """Every log line of a job, read in GetJobLog's pages."""
    lines: list[LogLine] = []
    while True:
        after = lines[-1].id if lines else 0
        page = await client.call_manager("GetJobLog", "st", job_id, after)
        lines += [LogLine(*line) for line in page]
        if len(page) < LOG_PAGE:
            return lines


def retry(screen: "HyperScreen", job_id: str) -> None:
    """Retry through the job's object while it is on the bus (the app's action, which
    also follows the new job), else through the Manager by id."""
    app = screen.hyper_app
    if job_id in app.client.mirror.jobs:
        app.retry_job(job_id)
        return

    async def by_id() -> None:
        try:
            path = await app.client.call_manager("RetryJob", "s", job_id)
        except ClientError as exc:
            app.report_error(exc)
            return
        app.notify(f"{job_id} retried as {job_id_from_path(path)}")

    screen.run_worker(by_id(), group="actions")
