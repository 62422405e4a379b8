"""org.hypersdk.HyperSDK1.Job: one object per job (see org.hypersdk.HyperSDK1.Job.xml)."""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from dbus_fast.service import ServiceInterface, dbus_property, method, signal
from dbus_fast.constants import PropertyAccess

from hypersdk.client.names import JOB_IFACE, job_path

from ..engine import JobEngine
from ..job_kinds import get_kind
from ..store import JobRecord
from .arguments import MAX_LOG_PAGE, page_option
from .dispatch import caller, require
from .polkit import UNKNOWN_UID

if TYPE_CHECKING:
    from .service import DBusService


COALESCE_SECONDS = 0.25
PROGRESS_PROPERTIES = ("Stage", "Progress", "ProgressValid", "BytesDone", "BytesTotal", "Rate",
                       "ExpectedEndTime")
STATUS_PROPERTIES = ("Status", "StartTime", "EndTime", "Error", "Result", "Cancelable",
                     "Attempts") + PROGRESS_PROPERTIES


def usec(seconds: float | None) -> int:
    return int(seconds * 1_000_000) if seconds else 0


class JobObject(ServiceInterface):
    def __init__(self, service: "DBusService", job_id: str) -> None:
        super().__init__(JOB_IFACE)
        self._service = service
        self._engine: JobEngine = service.engine
        self.job_id = job_id
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._finished: JobRecord | None = None

    @property
    def _job(self) -> JobRecord:
        """The job's record; a finished job never changes again, so it is read once."""
        if self._finished is not None:
            return self._finished
        job = self._engine.get(self.job_id)
        if job.finished:
            self._finished = job
        return job

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
        job = self._job
        if job.finished:
            self.Completed(job.status == "completed", job.error)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._dirty:
            return
        values = self._values()
        changed = {name: values[name] for name in sorted(self._dirty)}
        self._dirty.clear()
        self.emit_properties_changed(changed)

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _values(self) -> dict:
        job = self._job
        snap = self._engine.snapshot(job)
        return {
            "Status": job.status, "Stage": snap.stage, "Progress": snap.fraction,
            "ProgressValid": snap.valid, "BytesDone": snap.bytes_done,
            "BytesTotal": snap.bytes_total, "Rate": int(snap.rate),
            "ExpectedEndTime": snap.expected_end_usec, "StartTime": usec(job.started_at),
            "EndTime": usec(job.finished_at), "Error": job.error,
            "Result": json.dumps(job.result), "Cancelable": not job.finished,
            "Attempts": job.attempts,
        }

    # -- properties --------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.job_id

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> "s":
        kind = get_kind(self._job.kind)
        return kind.operation if kind else self._job.kind

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._job.status

    @dbus_property(access=PropertyAccess.READ)
    def Stage(self) -> "s":
        return self._engine.snapshot(self._job).stage

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        return self._engine.snapshot(self._job).fraction

    @dbus_property(access=PropertyAccess.READ)
    def ProgressValid(self) -> "b":
        return self._engine.snapshot(self._job).valid

    @dbus_property(access=PropertyAccess.READ)
    def BytesDone(self) -> "t":
        return self._engine.snapshot(self._job).bytes_done

    @dbus_property(access=PropertyAccess.READ)
    def BytesTotal(self) -> "t":
        return self._engine.snapshot(self._job).bytes_total

    @dbus_property(access=PropertyAccess.READ)
    def Rate(self) -> "t":
        return int(self._engine.snapshot(self._job).rate)

    @dbus_property(access=PropertyAccess.READ)
    def CreatedTime(self) -> "t":
        return usec(self._job.created_at)

    @dbus_property(access=PropertyAccess.READ)
    def StartTime(self) -> "t":
        return usec(self._job.started_at)

    @dbus_property(access=PropertyAccess.READ)
    def EndTime(self) -> "t":
        return usec(self._job.finished_at)

    @dbus_property(access=PropertyAccess.READ)
    def ExpectedEndTime(self) -> "t":
        return self._engine.snapshot(self._job).expected_end_usec

    @dbus_property(access=PropertyAccess.READ)
    def Cancelable(self) -> "b":
        return not self._job.finished

    @dbus_property(access=PropertyAccess.READ)
    def StartedByUID(self) -> "u":
        uid = self._job.started_by_uid
        return uid if uid >= 0 else UNKNOWN_UID

    @dbus_property(access=PropertyAccess.READ)
    def Attempts(self) -> "u":
        return self._job.attempts

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> "s":
        return self._job.error

    @dbus_property(access=PropertyAccess.READ)
    def Definition(self) -> "s":
        return json.dumps(self._job.definition)

    @dbus_property(access=PropertyAccess.READ)
    def Result(self) -> "s":
        return json.dumps(self._job.result)

    @dbus_property(access=PropertyAccess.READ)
    def VM(self) -> "s":
        return self._job.vm

    @dbus_property(access=PropertyAccess.READ)
    def Provider(self) -> "s":
        return self._job.provider

    @dbus_property(access=PropertyAccess.READ)
    def RequestedBy(self) -> "s":
        return self._job.requested_by

    @dbus_property(access=PropertyAccess.READ)
    def RetryOf(self) -> "s":
        return self._job.retry_of or ""

    # -- methods -----------------------------------------------------------------------
    def _owned_by_caller(self) -> bool:
        """Whether the caller asked for this job: the same REST user or Unix user (a job
        stored before principals were recorded: the same uid, and not through REST)."""
        job, who = self._job, caller()
        if job.requested_by:
            return who.principal == job.requested_by
        return not who.is_rest and who.uid == job.started_by_uid

    async def _require_own_or_other(self) -> None:
        await require("org.hypersdk.HyperSDK1.cancel-job" if self._owned_by_caller()
                      else "org.hypersdk.HyperSDK1.cancel-job-other-user")

    @method()
    async def Cancel(self, options: "a{sv}"):
        await self._require_own_or_other()
        self._engine.cancel(self.job_id)

    @method()
    async def Retry(self, options: "a{sv}") -> "o":
        """A new job with this one's definition; another user's job needs the right to
        act on other users' jobs too (cancel-job-other-user)."""
        job = self._job
        kind = get_kind(job.kind)
        who = await require(kind.polkit_action if kind else "org.hypersdk.HyperSDK1.export")
        if not self._owned_by_caller():
            await self._require_own_or_other()
        new_job = self._engine.retry(self.job_id, who.uid, who.principal)
        return job_path(new_job.id)

    @method()
    async def GetLog(self, after_id: "t", options: "a{sv}") -> "a(ttss)":
        await require("org.hypersdk.HyperSDK1.view")
        limit = page_option(options, "limit", MAX_LOG_PAGE, MAX_LOG_PAGE)
        return [[line.id, usec(line.time), line.level, line.message]
                for line in self._engine.store.logs(self.job_id, after_id, limit)]

    # -- signals -----------------------------------------------------------------------
    @signal()
    def LogLine(self, line_id: int, time_usec: int, level: str, message: str) -> "ttss":
        return [line_id, time_usec, level, message]

    @signal()
    def Completed(self, success: bool, message: str) -> "bs":
        return [success, message]
