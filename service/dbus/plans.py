"""Plan objects on the bus (org.hypersdk.HyperSDK1.Plan.xml), one per stored plan at
/plans/<id>, created through Manager.CreatePlan; their properties change as the plan's
VMs are released and end (PropertiesChanged)."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from hypersdk.client.names import PLAN_IFACE, plan_path

from ..errors import NotFound
from ..plans import Plan, Plans
from .dispatch import caller, require
from .job import VIEW, usec

if TYPE_CHECKING:
    from .dispatch import Dispatcher

log = logging.getLogger(__name__)
MANAGE_PLANS = "org.hypersdk.HyperSDK1.manage-plans"
EXPORT = "org.hypersdk.HyperSDK1.export"
OTHER_USERS_JOBS = "org.hypersdk.HyperSDK1.cancel-job-other-user"
CHANGING = ("Status", "Vms", "LastPreflight", "StartTime", "EndTime", "ReportPath")


class PlanObject(ServiceInterface):
    """The properties are the plan and its VMs' table as last read (dbus-fast's getters
    cannot await): PlanObjects reads them again when the plan changes."""

    def __init__(self, plans: Plans, plan: Plan, table: list[dict]) -> None:
        super().__init__(PLAN_IFACE)
        self._plans = plans
        self.plan_id = plan.id
        self.plan = plan
        self.table = table

    def announce(self) -> None:
        plan = self._plan()
        self.emit_properties_changed({name: getattr(self, "_value_" + name)(plan)
                                      for name in CHANGING})

    def _plan(self) -> Plan:
        return self.plan

    def _value_Status(self, plan: Plan) -> str:
        return plan.status

    def _value_Vms(self, plan: Plan) -> str:
        return json.dumps(self.table)

    def _value_LastPreflight(self, plan: Plan) -> str:
        return json.dumps(plan.preflight) if plan.preflight is not None else ""

    def _value_StartTime(self, plan: Plan) -> int:
        return usec(plan.started_at)

    def _value_EndTime(self, plan: Plan) -> int:
        return usec(plan.finished_at)

    def _value_ReportPath(self, plan: Plan) -> str:
        return plan.report_path

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.plan_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._plan().name

    @dbus_property(access=PropertyAccess.READ)
    def Provider(self) -> "s":
        return self._plan().definition["provider"]

    @dbus_property(access=PropertyAccess.READ)
    def RequestedBy(self) -> "s":
        return self._plan().requested_by

    @dbus_property(access=PropertyAccess.READ)
    def Definition(self) -> "s":
        return json.dumps(self._plan().definition)

    @dbus_property(access=PropertyAccess.READ)
    def CreatedTime(self) -> "t":
        return usec(self._plan().created_at)

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._value_Status(self._plan())

    @dbus_property(access=PropertyAccess.READ)
    def Vms(self) -> "s":
        return self._value_Vms(self._plan())

    @dbus_property(access=PropertyAccess.READ)
    def LastPreflight(self) -> "s":
        return self._value_LastPreflight(self._plan())

    @dbus_property(access=PropertyAccess.READ)
    def StartTime(self) -> "t":
        return self._value_StartTime(self._plan())

    @dbus_property(access=PropertyAccess.READ)
    def EndTime(self) -> "t":
        return self._value_EndTime(self._plan())

    @dbus_property(access=PropertyAccess.READ)
    def ReportPath(self) -> "s":
        return self._value_ReportPath(self._plan())

    @method()
    async def Preflight(self, options: "a{sv}") -> "s":
        await require(MANAGE_PLANS)
        return json.dumps(await self._plans.preflight(self.plan_id))

    async def _require_for_its_jobs(self) -> None:
        """Starting or cancelling a plan acts on jobs that are its creator's: for anyone
        else that needs the right to act on other users' jobs as well."""
        who = await require(MANAGE_PLANS)
        if who.principal != self._plan().requested_by:
            await require(OTHER_USERS_JOBS)

    @method()
    async def Start(self, options: "a{sv}"):
        await self._require_for_its_jobs()
        await require(EXPORT)
        await self._plans.start(self.plan_id)

    @method()
    async def Cancel(self, options: "a{sv}"):
        await self._require_for_its_jobs()
        await self._plans.cancel(self.plan_id)

    @method()
    async def Cutover(self, options: "a{sv}") -> "as":
        await self._require_for_its_jobs()
        return await self._plans.cutover(self.plan_id)

    @method()
    async def GetReport(self, options: "a{sv}") -> "s":
        await require(VIEW)
        return json.dumps(await self._plans.report(self.plan_id))


class PlanObjects:
    """Every stored plan on the bus, kept in step with `plans`."""

    def __init__(self, dispatcher: "Dispatcher", plans: Plans) -> None:
        self.dispatcher = dispatcher
        self.plans = plans
        self._objects: dict[str, PlanObject] = {}
        self._refreshing: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()  # changed while being read
        plans.on_change.append(self._on_change)

    async def export_all(self) -> None:
        for plan in await self.plans.list():
            self._add(plan, await self.plans.status_table(plan.id))

    def _add(self, plan: Plan, table: list[dict]) -> str:
        self._objects[plan.id] = PlanObject(self.plans, plan, table)
        self.dispatcher.export(plan_path(plan.id), self._objects[plan.id])
        return plan_path(plan.id)

    def _on_change(self, plan_id: str) -> None:
        """Read the plan again in the background (once more for the changes made while
        it is read), then announce it."""
        if plan_id in self._refreshing:
            self._again.add(plan_id)
            return
        self._refreshing[plan_id] = asyncio.create_task(self._refresh(plan_id))

    async def _refresh(self, plan_id: str) -> None:
        """Leaves `_refreshing` as it returns, with no await between its last look at
        `_again` and that: a change announced after the look starts a new refresh (a done
        callback runs a loop turn later, and a change in between was lost)."""
        try:
            await self._read_until_unchanged(plan_id)
        finally:
            self._refreshing.pop(plan_id, None)
            self._again.discard(plan_id)

    async def _read_until_unchanged(self, plan_id: str) -> None:
        again = True
        while again:
            try:
                plan = await self.plans.get(plan_id)
                table = await self.plans.status_table(plan_id)
            except NotFound:
                return
            except self.plans.store.errors as exc:  # the next change tells
                log.warning("cannot read plan %s again: %s", plan_id, exc)
                return
            obj = self._objects.get(plan_id)
            if obj is None:  # made through another instance sharing the store (fleet.py)
                self._add(plan, table)
            else:
                obj.plan, obj.table = plan, table
                obj.announce()
            again = plan_id in self._again
            self._again.discard(plan_id)

    async def create(self, definition: object) -> str:
        """Manager.CreatePlan, after its polkit check."""
        who = caller()
        plan = await self.plans.create(definition, who.uid, who.principal)
        return self._add(plan, await self.plans.status_table(plan.id))
