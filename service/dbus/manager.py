"""org.hypersdk.HyperSDK1.Manager (see org.hypersdk.HyperSDK1.Manager.xml)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from hypersdk.client.names import MANAGER_IFACE, job_path

from .. import __version__
from ..confine import open_source
from ..errors import InvalidArgument, Unavailable
from ..job_kinds import get_kind, kind_names
from ..store import JOB_STATUSES, JobRecord
from .arguments import (MAX_JOBS_PAGE, MAX_RECORDS_BYTES, option, page_option, parse_json,
                        text_option)
from .dispatch import caller, require
from .job import (VIEW, cancel_job, cutover_job, job_record, log_page, records_within,
                  retry_job)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..engine import JobEngine
    from .automation import AutomationObjects
    from .job import JobObject
    from .plans import PlanObjects

EXPORT_METHODS = ["ova", "ovf", "disk"]
OUTPUT_FORMATS = ["qcow2", "raw"]

@dataclass(frozen=True)
class JobQuery:
    """ListJobs' and ListJobRecords' options: filters ("" for any) and the page."""

    status: str
    provider: str
    limit: int
    offset: int

    @classmethod
    def from_options(cls, options: dict) -> "JobQuery":
        return cls(text_option(options, "status", JOB_STATUSES), text_option(options, "provider"),
                   page_option(options, "limit", MAX_JOBS_PAGE, MAX_JOBS_PAGE),
                   page_option(options, "offset", 0, 2 ** 63 - 1))

    def matches(self, job: JobRecord) -> bool:
        return ((not self.status or job.status == self.status)
                and (not self.provider or job.provider == self.provider))


def parse_vmdk_confined(value: str, roots: list[str]) -> dict:
    """parse_vmdk of a caller-named file inside the source roots; its extents are opened
    next to it, never through links (disks/vmdk.py); paths in the answer as named."""
    from ..disks.vmdk import parse_vmdk  # noqa: PLC0415 - keeps start-up light
    with open_source(value, roots, "path") as opened:
        through_fd = str(opened.dir_path.parent)
        result = parse_vmdk(opened.dir_path)
    result["path"] = str(opened.shown)
    for extent in result["extents"]:
        if "path" in extent:
            extent["path"] = extent["path"].replace(through_fd, str(opened.shown.parent), 1)
    return result


class ManagerObject(ServiceInterface):
    """`on_bus`: the job objects exported now (ListJobs); `automation`: schedules, backup
    policies and webhooks, when the service runs them."""

    def __init__(self, engine: JobEngine, on_bus: "Mapping[str, JobObject]",
                 automation: "AutomationObjects | None",
                 plans: "PlanObjects | None" = None) -> None:
        super().__init__(MANAGER_IFACE)
        self._engine = engine
        self._on_bus = on_bus
        self._automation_objects = automation
        self._plan_objects = plans
        # the store's counts as last read (the getter cannot await): DBusService
        # reads them at start and after each job is created, changes status or goes
        self.job_counts: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)

    async def _submit(self, kind_name: str, definition_json: str) -> str:
        kind = get_kind(kind_name)
        if kind is None:
            raise InvalidArgument("kind", f"unknown job kind {kind_name!r}; known: "
                                  + ", ".join(kind_names()))
        who = await require(kind.polkit_action)
        definition = parse_json(definition_json, "definition")
        job = await self._engine.submit(kind_name, definition, who.uid,
                                        requested_by=who.principal)
        return job_path(job.id)

    def capabilities(self) -> dict:
        features = ["hyper2kvm_daemon_mode", "direct_pipeline"]
        if self._automation_objects is not None:
            features += ["schedules", "backup_policies", "webhooks"]
        if self._plan_objects is not None:
            features.append("plans")
        return {"providers": self._engine.providers.capabilities(), "job_kinds": kind_names(),
                "export_methods": EXPORT_METHODS, "output_formats": OUTPUT_FORMATS,
                "features": features}

    # -- properties --------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> "s":
        return json.dumps(self.capabilities())

    @dbus_property(access=PropertyAccess.READ)
    def JobCounts(self) -> "a{su}":
        return self.job_counts

    # -- jobs --------------------------------------------------------------------------
    @method()
    async def SubmitJob(self, definition: "s", options: "a{sv}") -> "o":
        return await self._submit(str(option(options, "kind", "export")), definition)

    @method()
    async def ListJobs(self, options: "a{sv}") -> "ao":
        """The job objects on the bus: unfinished jobs and those finished less than
        daemon.finished_job_linger ago (ListJobRecords reads every stored job)."""
        await require(VIEW)
        query = JobQuery.from_options(options)
        jobs = sorted((obj.record for obj in self._on_bus.values()),
                      key=lambda job: (job.created_at, job.id))
        matching = [job for job in jobs if query.matches(job)]
        return [job_path(job.id) for job in matching[query.offset:query.offset + query.limit]]

    @method()
    async def ListJobRecords(self, options: "a{sv}") -> "aa{sv}u":
        """Stored jobs as records (the Job properties), oldest first, and how many match."""
        await require(VIEW)
        query = JobQuery.from_options(options)
        jobs = await self._engine.list(query.status or None, query.limit, query.offset,
                                       query.provider or None)
        return [records_within(self._engine, jobs, MAX_RECORDS_BYTES),
                await self._engine.store.count_jobs(query.status or None,
                                                    query.provider or None)]

    @method()
    async def GetJob(self, job_id: "s", options: "a{sv}") -> "a{sv}":
        await require(VIEW)
        return job_record(self._engine, await self._engine.get(job_id))

    @method()
    async def CancelJob(self, job_id: "s", options: "a{sv}"):
        await cancel_job(self._engine, await self._engine.get(job_id))

    @method()
    async def CutoverJob(self, job_id: "s", options: "a{sv}"):
        await cutover_job(self._engine, await self._engine.get(job_id))

    @method()
    async def RetryJob(self, job_id: "s", options: "a{sv}") -> "o":
        return await retry_job(self._engine, await self._engine.get(job_id))

    @method()
    async def GetJobLog(self, job_id: "s", after_id: "t", options: "a{sv}") -> "a(ttss)":
        lines = await log_page(self._engine, job_id, after_id, options)
        if not lines:
            await self._engine.get(job_id)  # NotFound for a job that does not exist
        return lines

    @method()
    async def Convert(self, request: "s", options: "a{sv}") -> "o":
        return await self._submit("convert", request)

    @method()
    async def ImportToKvm(self, request: "s", options: "a{sv}") -> "o":
        return await self._submit("import", request)

    # -- discovery ---------------------------------------------------------------------
    @method()
    async def ListVMs(self, provider: "s", filter: "s", options: "a{sv}") -> "s":
        await require(VIEW)
        vm_filter = parse_json(filter, "filter")
        source = await self._engine.providers.get(provider)
        vms = await source.list_vms(vm_filter)
        return json.dumps([vm.to_dict() for vm in vms])

    @method()
    async def GetVMInfo(self, provider: "s", identifier: "s", options: "a{sv}") -> "s":
        await require(VIEW)
        if not identifier:
            raise InvalidArgument("identifier", "must not be empty")
        source = await self._engine.providers.get(provider)
        return json.dumps((await source.get_vm(identifier)).to_dict())

    @method()
    async def ParseVmdk(self, path: "s", options: "a{sv}") -> "s":
        await require(VIEW)
        return json.dumps(await asyncio.to_thread(parse_vmdk_confined, path,
                                                  self._engine.config.paths.sources))

    # -- automation --------------------------------------------------------------------
    def _automation(self):
        if self._automation_objects is None:
            raise Unavailable("schedules, backup policies and webhooks are not available")
        return self._automation_objects

    @method()
    async def CreateSchedule(self, definition: "s", options: "a{sv}") -> "o":
        await require("org.hypersdk.HyperSDK1.manage-schedules")
        return await self._automation().create_schedule(parse_json(definition, "definition"),
                                                        caller().uid)

    @method()
    async def CreateBackupPolicy(self, definition: "s", options: "a{sv}") -> "o":
        await require("org.hypersdk.HyperSDK1.manage-backup-policies")
        return await self._automation().create_backup_policy(
            parse_json(definition, "definition"), caller().uid)

    @method()
    async def ConfigureWebhook(self, definition: "s", options: "a{sv}") -> "o":
        await require("org.hypersdk.HyperSDK1.manage-webhooks")
        return await self._automation().configure_webhook(parse_json(definition, "definition"),
                                                          caller().uid)

    # -- plans -------------------------------------------------------------------------
    @method()
    async def CreatePlan(self, definition: "s", options: "a{sv}") -> "o":
        await require("org.hypersdk.HyperSDK1.manage-plans")
        if self._plan_objects is None:
            raise Unavailable("migration plans are not available")
        return await self._plan_objects.create(parse_json(definition, "definition"))
