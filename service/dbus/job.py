"""org.hypersdk.HyperSDK1.Job: one object per job on the bus (unfinished, or finished less than
daemon.finished_job_linger ago; see org.hypersdk.HyperSDK1.Job.xml), and what the Manager
shares with it to read and act on any stored job by id."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Iterable

from dbus_fast import Variant
from dbus_fast.service import ServiceInterface, dbus_property, method, signal
from dbus_fast.constants import PropertyAccess

from hypersdk.client.names import JOB_IFACE, job_path

from ..engine import JobEngine
from ..job_kinds import get_kind
from ..progress import ProgressSnapshot
from ..store import JobRecord
from .arguments import MAX_LOG_PAGE, page_option
from .dispatch import caller, require
from .polkit import UNKNOWN_UID

VIEW = "org.hypersdk.HyperSDK1.view"
COALESCE_SECONDS = 0.25
PROGRESS_PROPERTIES = ("Stage", "Progress", "ProgressValid", "BytesDone", "BytesTotal", "Rate",
                       "ExpectedEndTime")
STATUS_PROPERTIES = ("Status", "StartTime", "EndTime", "Error", "Result", "Cancelable",
                     "Attempts") + PROGRESS_PROPERTIES


def usec(seconds: float | None) -> int:
    return int(seconds * 1_000_000) if seconds else 0


def _operation(job: JobRecord) -> str:
    kind = get_kind(job.kind)
    return kind.operation if kind else job.kind


Getter = Callable[[JobRecord, ProgressSnapshot], Any]

# Every property of the Job interface: its D-Bus type and how it is read from the record
# and its progress; the Job object's getters and Manager.ListJobRecords/GetJob share it.
JOB_PROPERTIES: dict[str, tuple[str, Getter]] = {
    "Id": ("s", lambda job, snap: job.id),
    "Operation": ("s", lambda job, snap: _operation(job)),
    "Status": ("s", lambda job, snap: job.status),
    "Stage": ("s", lambda job, snap: snap.stage),
    "Progress": ("d", lambda job, snap: snap.fraction),
    "ProgressValid": ("b", lambda job, snap: snap.valid),
    "BytesDone": ("t", lambda job, snap: snap.bytes_done),
    "BytesTotal": ("t", lambda job, snap: snap.bytes_total),
    "Rate": ("t", lambda job, snap: int(snap.rate)),
    "CreatedTime": ("t", lambda job, snap: usec(job.created_at)),
    "StartTime": ("t", lambda job, snap: usec(job.started_at)),
    "EndTime": ("t", lambda job, snap: usec(job.finished_at)),
    "ExpectedEndTime": ("t", lambda job, snap: snap.expected_end_usec),
    "Cancelable": ("b", lambda job, snap: not job.finished),
    "StartedByUID": ("u", lambda job, snap: job.started_by_uid if job.started_by_uid >= 0
                     else UNKNOWN_UID),
    "Attempts": ("u", lambda job, snap: job.attempts),
    "Error": ("s", lambda job, snap: job.error),
    "Definition": ("s", lambda job, snap: json.dumps(job.definition)),
    "Result": ("s", lambda job, snap: json.dumps(job.result)),
    "VM": ("s", lambda job, snap: job.vm),
    "Provider": ("s", lambda job, snap: job.provider),
    "RequestedBy": ("s", lambda job, snap: job.requested_by),
    "RetryOf": ("s", lambda job, snap: job.retry_of or ""),
    "Instance": ("s", lambda job, snap: job.instance),
}


def job_values(engine: JobEngine, job: JobRecord, names: Iterable[str]) -> dict[str, Any]:
    snap = engine.snapshot(job)
    return {name: JOB_PROPERTIES[name][1](job, snap) for name in names}


def job_record(engine: JobEngine, job: JobRecord) -> dict[str, Variant]:
    """The job as the Job object's properties would show it (Manager.GetJob)."""
    values = job_values(engine, job, JOB_PROPERTIES)
    return {name: Variant(JOB_PROPERTIES[name][0], value) for name, value in values.items()}


def records_within(engine: JobEngine, jobs: Iterable[JobRecord],
                   budget: int) -> list[dict[str, Variant]]:
    """job_record of each job in order, ending before the one whose record would take the
    page past `budget` bytes (roughly as marshalled); the first is always there."""
    records: list[dict[str, Variant]] = []
    size = 0
    for job in jobs:
        record = job_record(engine, job)
        size += sum(len(name) + 16 + (len(variant.value.encode())
                                      if isinstance(variant.value, str) else 8)
                    for name, variant in record.items())
        if records and size > budget:
            break
        records.append(record)
    return records


# -- what callers may do with a job, on its object or through the Manager by id ----------
def owned_by_caller(job: JobRecord) -> bool:
    """Whether the caller asked for this job: the same REST user or Unix user (a job
    stored before principals were recorded: the same uid, and not through REST)."""
    who = caller()
    if job.requested_by:
        return who.principal == job.requested_by
    return not who.is_rest and who.uid == job.started_by_uid


async def require_own_or_other(job: JobRecord) -> None:
    await require("org.hypersdk.HyperSDK1.cancel-job" if owned_by_caller(job)
                  else "org.hypersdk.HyperSDK1.cancel-job-other-user")


async def cancel_job(engine: JobEngine, job: JobRecord) -> None:
    await require_own_or_other(job)
    await engine.cancel(job.id)


async def cutover_job(engine: JobEngine, job: JobRecord) -> None:
    """Start a warm export's cutover; polkit as for cancelling it."""
    await require_own_or_other(job)
    await engine.cutover(job.id)


async def retry_job(engine: JobEngine, job: JobRecord) -> str:
    """A new job with this one's definition; another user's job needs the right to
    act on other users' jobs too (cancel-job-other-user). Returns its path."""
    kind = get_kind(job.kind)
    who = await require(kind.polkit_action if kind else "org.hypersdk.HyperSDK1.export")
    if not owned_by_caller(job):
        await require_own_or_other(job)
    return job_path((await engine.retry(job.id, who.uid, who.principal)).id)


async def log_page(engine: JobEngine, job_id: str, after_id: int, options: dict) -> list:
    await require(VIEW)
    limit = page_option(options, "limit", MAX_LOG_PAGE, MAX_LOG_PAGE)
    return [[line.id, usec(line.time), line.level, line.message]
            for line in await engine.store.logs(job_id, after_id, limit)]


class JobObject(ServiceInterface):
    """The properties are read from the record the object was made with, replaced by
    the record of every event about the job (`heard`), or the live one while the job
    runs here: never from the store (dbus-fast's getters cannot await)."""

    def __init__(self, engine: JobEngine, job: JobRecord) -> None:
        super().__init__(JOB_IFACE)
        self._engine = engine
        self.job_id = job.id
        self._heard = job
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.TimerHandle | None = None

    @property
    def record(self) -> JobRecord:
        return self._engine.known(self.job_id) or self._heard

    def heard(self, job: JobRecord) -> None:
        """The job as an event told it."""
        self._heard = job

    def _get(self, name: str) -> Any:
        return job_values(self._engine, self.record, (name,))[name]

    # -- change announcements ----------------------------------------------------------
    def progress_changed(self) -> None:
        """Coalesce: at most one PropertiesChanged per COALESCE_SECONDS for progress."""
        self._dirty.update(PROGRESS_PROPERTIES)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(COALESCE_SECONDS, self.flush)

    def status_changed(self) -> None:
        """Status changes are sent at once, with any pending progress."""
        self._dirty.update(STATUS_PROPERTIES)
        self.flush()
        job = self.record
        if job.finished:
            self.Completed(job.status == "completed", job.error)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._dirty:
            return
        changed = job_values(self._engine, self.record, sorted(self._dirty))
        self._dirty.clear()
        self.emit_properties_changed(changed)

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    # -- properties (JOB_PROPERTIES) ---------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.job_id

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> "s":
        return self._get("Operation")

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._get("Status")

    @dbus_property(access=PropertyAccess.READ)
    def Stage(self) -> "s":
        return self._get("Stage")

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        return self._get("Progress")

    @dbus_property(access=PropertyAccess.READ)
    def ProgressValid(self) -> "b":
        return self._get("ProgressValid")

    @dbus_property(access=PropertyAccess.READ)
    def BytesDone(self) -> "t":
        return self._get("BytesDone")

    @dbus_property(access=PropertyAccess.READ)
    def BytesTotal(self) -> "t":
        return self._get("BytesTotal")

    @dbus_property(access=PropertyAccess.READ)
    def Rate(self) -> "t":
        return self._get("Rate")

    @dbus_property(access=PropertyAccess.READ)
    def CreatedTime(self) -> "t":
        return self._get("CreatedTime")

    @dbus_property(access=PropertyAccess.READ)
    def StartTime(self) -> "t":
        return self._get("StartTime")

    @dbus_property(access=PropertyAccess.READ)
    def EndTime(self) -> "t":
        return self._get("EndTime")

    @dbus_property(access=PropertyAccess.READ)
    def ExpectedEndTime(self) -> "t":
        return self._get("ExpectedEndTime")

    @dbus_property(access=PropertyAccess.READ)
    def Cancelable(self) -> "b":
        return self._get("Cancelable")

    @dbus_property(access=PropertyAccess.READ)
    def StartedByUID(self) -> "u":
        return self._get("StartedByUID")

    @dbus_property(access=PropertyAccess.READ)
    def Attempts(self) -> "u":
        return self._get("Attempts")

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> "s":
        return self._get("Error")

    @dbus_property(access=PropertyAccess.READ)
    def Definition(self) -> "s":
        return self._get("Definition")

    @dbus_property(access=PropertyAccess.READ)
    def Result(self) -> "s":
        return self._get("Result")

    @dbus_property(access=PropertyAccess.READ)
    def VM(self) -> "s":
        return self._get("VM")

    @dbus_property(access=PropertyAccess.READ)
    def Provider(self) -> "s":
        return self._get("Provider")

    @dbus_property(access=PropertyAccess.READ)
    def RequestedBy(self) -> "s":
        return self._get("RequestedBy")

    @dbus_property(access=PropertyAccess.READ)
    def RetryOf(self) -> "s":
        return self._get("RetryOf")

    @dbus_property(access=PropertyAccess.READ)
    def Instance(self) -> "s":
        return self._get("Instance")

    # -- methods -----------------------------------------------------------------------
    @method()
    async def Cancel(self, options: "a{sv}"):
        await cancel_job(self._engine, self.record)

    @method()
    async def Cutover(self, options: "a{sv}"):
        await cutover_job(self._engine, self.record)

    @method()
    async def Retry(self, options: "a{sv}") -> "o":
        return await retry_job(self._engine, self.record)

    @method()
    async def GetLog(self, after_id: "t", options: "a{sv}") -> "a(ttss)":
        return await log_page(self._engine, self.job_id, after_id, options)

    # -- signals -----------------------------------------------------------------------
    @signal()
    def LogLine(self, line_id: int, time_usec: int, level: str, message: str) -> "ttss":
        return [line_id, time_usec, level, message]

    @signal()
    def Completed(self, success: bool, message: str) -> "bs":
        return [success, message]
