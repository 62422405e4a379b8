"""org.hypersdk.HyperSDK1.Manager (see org.hypersdk.HyperSDK1.Manager.xml)."""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from hypersdk.client.names import MANAGER_IFACE, job_path

from .. import __version__
from ..confine import open_source
from ..errors import InvalidArgument, Unavailable
from ..job_kinds import get_kind, kind_names
from .arguments import MAX_JOBS_PAGE, option, page_option, parse_json
from .dispatch import caller, require

if TYPE_CHECKING:
    from .service import DBusService


VIEW = "org.hypersdk.HyperSDK1.view"


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
    def __init__(self, service: "DBusService") -> None:
        super().__init__(MANAGER_IFACE)
        self._service = service
        self._engine = service.engine

    async def _submit(self, kind_name: str, definition_json: str) -> str:
        kind = get_kind(kind_name)
        if kind is None:
            raise InvalidArgument("kind", f"unknown job kind {kind_name!r}; known: "
                                  + ", ".join(kind_names()))
        who = await require(kind.polkit_action)
        definition = parse_json(definition_json, "definition")
        job = self._engine.submit(kind_name, definition, who.uid, requested_by=who.principal)
        return job_path(job.id)

    # -- properties --------------------------------------------------------------------
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Capabilities(self) -> "s":
        return json.dumps(self._service.capabilities())

    @dbus_property(access=PropertyAccess.READ)
    def JobCounts(self) -> "a{su}":
        return self._service.job_counts()

    # -- jobs --------------------------------------------------------------------------
    @method()
    async def SubmitJob(self, definition: "s", options: "a{sv}") -> "o":
        return await self._submit(str(option(options, "kind", "export")), definition)

    @method()
    async def ListJobs(self, options: "a{sv}") -> "ao":
        await require(VIEW)
        status = option(options, "status")
        jobs = self._engine.list(status, page_option(options, "limit", MAX_JOBS_PAGE,
                                                     MAX_JOBS_PAGE),
                                 page_option(options, "offset", 0, 2 ** 63 - 1))
        return [job_path(job.id) for job in jobs]

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
        if self._service.automation is None:
            raise Unavailable("schedules, backup policies and webhooks are not available")
        return self._service.automation

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
