"""The D-Bus face of hypervisord: owns the objects and keeps them in step with the engine."""
from __future__ import annotations

import asyncio
import logging
import time
from dbus_fast import RequestNameReply
from dbus_fast.aio import MessageBus

from hypersdk.client.names import BUS_NAME, MANAGER_PATH, job_path

from ..automation import Automation
from ..engine import JobEngine, JobEvent
from ..errors import Failed
from ..plans import Plans
from ..store import JobRecord
from .automation import AutomationObjects
from .dispatch import Dispatcher
from .job import JobObject, usec
from .manager import ManagerObject
from .plans import PlanObjects
from .polkit import Authority

log = logging.getLogger(__name__)

class DBusService:
    """The objects on the bus: the Manager, one object per job while it is followed, and
    the automation objects when `automation` runs."""

    def __init__(self, bus: MessageBus, engine: JobEngine, automation: Automation | None,
                 trusted_uids: frozenset[int] = frozenset({0}),
                 plans: Plans | None = None) -> None:
        self.bus = bus
        self.engine = engine
        self.dispatcher = Dispatcher(bus, Authority(bus), trusted_uids, engine.store.errors)
        self.automation = (AutomationObjects(self.dispatcher, automation)
                           if automation is not None else None)
        self.plans = PlanObjects(self.dispatcher, plans) if plans is not None else None
        self.jobs: dict[str, JobObject] = {}
        self.manager = ManagerObject(engine, self.jobs, self.automation, self.plans)
        self._leaving: dict[str, asyncio.TimerHandle] = {}  # finished jobs still lingering
        self.linger = engine.config.daemon.finished_job_linger
        self._counting: asyncio.Task | None = None  # reading JobCounts from the store
        self._recount = False  # counts changed while they were being read

    async def export_all(self) -> None:
        """Export the Manager and the jobs clients may still follow: unfinished ones and
        those finished less than daemon.finished_job_linger ago (the others are read
        through Manager.ListJobRecords/GetJob); then follow the engine."""
        self.dispatcher.export(MANAGER_PATH, self.manager)
        if self.automation is not None:
            await self.automation.export_all()
        if self.plans is not None:
            await self.plans.export_all()
        for job in await self.engine.store.jobs_unfinished_or_since(time.time() - self.linger):
            self._export_job(job)
            if job.finished:
                self._leave_later(job)
        self.manager.job_counts = await self.engine.store.count_by_status()
        self.engine.subscribe(self._on_job_event)

    async def own_name(self) -> None:
        reply = await self.bus.request_name(BUS_NAME)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise Failed(f"could not own the bus name {BUS_NAME} ({reply.name}); "
                         "is another hypervisord running?")

    def _export_job(self, job: JobRecord) -> None:
        if job.id in self.jobs:  # another instance's job, seen by both (fleet.py)
            return
        obj = JobObject(self.engine, job)
        self.jobs[job.id] = obj
        self.dispatcher.export(job_path(job.id), obj)

    def _leave_later(self, job: JobRecord) -> None:
        """Unexport a finished job once it has lingered, as udisks does with its jobs
        (at once when the linger is 0: its Completed signal has been sent)."""
        remaining = (job.finished_at or 0) + self.linger - time.time()
        if remaining <= 0:
            self._unexport_job(job.id)
        elif job.id not in self._leaving:
            self._leaving[job.id] = asyncio.get_running_loop().call_later(
                remaining, self._unexport_job, job.id)

    def _unexport_job(self, job_id: str) -> None:
        leaving = self._leaving.pop(job_id, None)
        if leaving is not None:
            leaving.cancel()
        obj = self.jobs.pop(job_id, None)
        if obj is not None:
            obj.close()
            self.dispatcher.unexport(job_path(job_id))

    def _on_job_event(self, event: JobEvent) -> None:
        job = event.job
        if event.type == "created":
            self._export_job(job)
            self._counts_changed()
            return
        if event.type == "removed":
            self._unexport_job(job.id)
            self._counts_changed()
            return
        obj = self.jobs.get(job.id)
        if obj is None:
            return
        obj.heard(job)
        if event.type == "progress":
            obj.progress_changed()
        elif event.type == "status":
            obj.status_changed()
            self._counts_changed()
            if job.finished:
                self._leave_later(job)
        elif event.type == "log" and event.line is not None:
            line = event.line
            obj.LogLine(line.id, usec(line.time), line.level, line.message)

    def _counts_changed(self) -> None:
        """Read the counts again in the background and announce them (once for the
        changes made while a read is under way)."""
        if self._counting is not None:
            self._recount = True
            return
        self._counting = asyncio.create_task(self._count(), name="job-counts")

    async def _count(self) -> None:
        try:
            self._recount = True
            while self._recount:
                self._recount = False
                try:
                    counts = await self.engine.store.count_by_status()
                except self.engine.store.errors as exc:
                    log.warning("cannot count the jobs for JobCounts: %s", exc)
                    return
                if counts != self.manager.job_counts:
                    self.manager.job_counts = counts
                    self.manager.emit_properties_changed({"JobCounts": counts})
        finally:
            self._counting = None

    async def close(self) -> None:
        if self._counting is not None:
            self._counting.cancel()
        for leaving in self._leaving.values():
            leaving.cancel()
        for obj in self.jobs.values():
            obj.close()
        await self.dispatcher.close()
