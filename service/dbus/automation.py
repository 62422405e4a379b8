"""Schedule, BackupPolicy and Webhook objects on the bus (see their introspection XML).

`AutomationObjects` is what the Manager creates items through: it creates
items through the `Automation` facade, exports one object per item under
/schedules, /backup_policies and /webhooks (listed by the root ObjectManager),
and announces property changes. Webhook secrets never leave the service; header
values that look like credentials are redacted.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from hypersdk.client.names import (BACKUP_POLICIES, BACKUP_POLICY_IFACE, SCHEDULE_IFACE,
                                    SCHEDULES, WEBHOOK_IFACE, WEBHOOKS, job_path)

from ..automation import Automation
from ..errors import NotFound
from ..job_kinds import get_kind
from .dispatch import caller, require
from .job import usec
from .arguments import page_option
from .manager import VIEW

if TYPE_CHECKING:
    from .dispatch import Dispatcher

log = logging.getLogger(__name__)
MANAGE_SCHEDULES = "org.hypersdk.HyperSDK1.manage-schedules"
MANAGE_POLICIES = "org.hypersdk.HyperSDK1.manage-backup-policies"
MANAGE_WEBHOOKS = "org.hypersdk.HyperSDK1.manage-webhooks"
COLLECTIONS = {"schedule": SCHEDULES, "policy": BACKUP_POLICIES, "webhook": WEBHOOKS}


def item_path(collection: str, item_id: str) -> str:
    return f"{COLLECTIONS[collection].path}/{item_id.replace('-', '_')}"


async def require_kind_action(kind_name: object) -> None:
    """Scheduling jobs of a kind needs the right to submit that kind, too."""
    kind = get_kind(kind_name) if isinstance(kind_name, str) else None
    if kind is not None:
        await require(kind.polkit_action)


class _ItemObject(ServiceInterface):
    collection = ""
    changing: tuple[str, ...] = ()

    def __init__(self, objects: "AutomationObjects", item, interface: str) -> None:
        super().__init__(interface)
        self._objects = objects
        self._automation = objects.automation
        self.item_id = item.id
        # the item as last read (dbus-fast's getters cannot await): AutomationObjects
        # reads it again when it changes
        self.item = item

    def announce(self) -> None:
        values = {name: getattr(self, "_value_" + name)() for name in self.changing}
        self.emit_properties_changed(values)

    def _delete(self) -> None:
        self._objects.remove(self.collection, self.item_id)


class _TimedItemObject(_ItemObject):
    """Items that run on a timetable (schedules, backup policies): Enabled, NextRun, LastRun."""

    def _value_Enabled(self) -> bool:
        return self.item.enabled

    def _value_NextRun(self) -> int:
        return usec(self.item.next_run)

    def _value_LastRun(self) -> int:
        return usec(self.item.last_run)


class ScheduleObject(_TimedItemObject):
    collection = "schedule"
    changing = ("Enabled", "NextRun", "LastRun", "LastJob")

    def __init__(self, objects: "AutomationObjects", item) -> None:
        super().__init__(objects, item, SCHEDULE_IFACE)

    def _value_LastJob(self) -> str:
        last_job = self.item.last_job
        return job_path(last_job) if last_job else "/"

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.item_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.item.name

    @dbus_property(access=PropertyAccess.READ)
    def Cron(self) -> "s":
        return self.item.cron.expression

    @dbus_property(access=PropertyAccess.READ)
    def Timezone(self) -> "s":
        return self.item.cron.zone.key

    @dbus_property(access=PropertyAccess.READ)
    def Enabled(self) -> "b":
        return self._value_Enabled()

    @dbus_property(access=PropertyAccess.READ)
    def NextRun(self) -> "t":
        return self._value_NextRun()

    @dbus_property(access=PropertyAccess.READ)
    def LastRun(self) -> "t":
        return self._value_LastRun()

    @dbus_property(access=PropertyAccess.READ)
    def LastJob(self) -> "o":
        return self._value_LastJob()

    @dbus_property(access=PropertyAccess.READ)
    def Definition(self) -> "s":
        return json.dumps(self.item.to_dict())

    @method()
    async def SetEnabled(self, enabled: "b", options: "a{sv}"):
        await require(MANAGE_SCHEDULES)
        await self._automation.schedules.set_enabled(self.item_id, enabled)
        self._automation.wake()

    @method()
    async def RunNow(self, options: "a{sv}") -> "o":
        await require(MANAGE_SCHEDULES)
        await require_kind_action(self.item.kind)
        return job_path((await self._automation.schedules.run_now(self.item_id,
                                                                  caller().uid)).id)

    @method()
    async def Delete(self, options: "a{sv}"):
        await require(MANAGE_SCHEDULES)
        await self._automation.schedules.delete(self.item_id)
        self._delete()


class BackupPolicyObject(_TimedItemObject):
    collection = "policy"
    changing = ("Enabled", "NextRun", "LastRun")

    def __init__(self, objects: "AutomationObjects", item) -> None:
        super().__init__(objects, item, BACKUP_POLICY_IFACE)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.item_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.item.name

    @dbus_property(access=PropertyAccess.READ)
    def Definition(self) -> "s":
        return json.dumps(self.item.definition)

    @dbus_property(access=PropertyAccess.READ)
    def Schedule(self) -> "s":
        return self.item.definition["schedule"]

    @dbus_property(access=PropertyAccess.READ)
    def Enabled(self) -> "b":
        return self._value_Enabled()

    @dbus_property(access=PropertyAccess.READ)
    def NextRun(self) -> "t":
        return self._value_NextRun()

    @dbus_property(access=PropertyAccess.READ)
    def LastRun(self) -> "t":
        return self._value_LastRun()

    @method()
    async def SetEnabled(self, enabled: "b", options: "a{sv}"):
        await require(MANAGE_POLICIES)
        await self._automation.policies.set_enabled(self.item_id, enabled)
        self._automation.wake()

    @method()
    async def Run(self, options: "a{sv}") -> "ao":
        await require(MANAGE_POLICIES)
        await require_kind_action(self._automation.policies.kind)
        jobs = await self._automation.policies.run(self.item_id, caller().uid)
        return [job_path(job.id) for job in jobs]

    @method()
    async def DryRun(self, options: "a{sv}") -> "s":
        await require(VIEW)
        return json.dumps(await self._automation.policies.dry_run(self.item_id))

    @method()
    async def Delete(self, options: "a{sv}"):
        await require(MANAGE_POLICIES)
        await self._automation.policies.delete(self.item_id)
        self._delete()


class WebhookObject(_ItemObject):
    collection = "webhook"
    changing = ("Enabled",)

    def __init__(self, objects: "AutomationObjects", item) -> None:
        super().__init__(objects, item, WEBHOOK_IFACE)

    def _public(self) -> dict:
        return self.item.public()

    def _value_Enabled(self) -> bool:
        return self._public()["enabled"]

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.item_id

    @dbus_property(access=PropertyAccess.READ)
    def Url(self) -> "s":
        return self._public()["url"]

    @dbus_property(access=PropertyAccess.READ)
    def Events(self) -> "as":
        return self._public()["events"]

    @dbus_property(access=PropertyAccess.READ)
    def Headers(self) -> "a{ss}":
        return self._public()["headers"]

    @dbus_property(access=PropertyAccess.READ)
    def HasSecret(self) -> "b":
        return self._public()["has_secret"]

    @dbus_property(access=PropertyAccess.READ)
    def Enabled(self) -> "b":
        return self._value_Enabled()

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> "s":
        return self._public()["source"]

    @method()
    async def SetEnabled(self, enabled: "b", options: "a{sv}"):
        await require(MANAGE_WEBHOOKS)
        await self._automation.webhooks.set_enabled(self.item_id, enabled)

    @method()
    async def Delete(self, options: "a{sv}"):
        await require(MANAGE_WEBHOOKS)
        await self._automation.webhooks.delete(self.item_id)
        self._delete()

    @method()
    async def GetDeliveries(self, options: "a{sv}") -> "s":
        await require(VIEW)
        limit = page_option(options, "limit", 100, 1000)
        return json.dumps(await self._automation.webhooks.deliveries(self.item_id, limit))

    @method()
    async def Test(self, options: "a{sv}"):
        await require(MANAGE_WEBHOOKS)
        await self._automation.webhooks.test(self.item_id)


OBJECT_CLASSES = {"schedule": ScheduleObject, "policy": BackupPolicyObject,
                  "webhook": WebhookObject}


class AutomationObjects:
    """What the Manager creates schedules, policies and webhooks with; keeps their objects
    on the bus."""

    def __init__(self, dispatcher: "Dispatcher", automation: Automation) -> None:
        self.dispatcher = dispatcher
        self.automation = automation
        self._objects: dict[tuple[str, str], _ItemObject] = {}
        self._items = {"schedule": automation.schedules, "policy": automation.policies,
                       "webhook": automation.webhooks}
        self._refreshing: set[asyncio.Task] = set()
        automation.on_change.append(self._on_change)

    async def export_all(self) -> None:
        for collection, items in self._items.items():
            for item in await items.list():
                self._add(collection, item)

    def _add(self, collection: str, item) -> str:
        obj = OBJECT_CLASSES[collection](self, item)
        path = item_path(collection, item.id)
        self._objects[(collection, item.id)] = obj
        self.dispatcher.export(path, obj)
        return path

    def remove(self, collection: str, item_id: str) -> None:
        if self._objects.pop((collection, item_id), None) is not None:
            self.dispatcher.unexport(item_path(collection, item_id))

    def _on_change(self, collection: str, item_id: str) -> None:
        """Read the changed item again in the background, then announce it."""
        if (collection, item_id) in self._objects:
            task = asyncio.create_task(self._refresh(collection, item_id))
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, collection: str, item_id: str) -> None:
        try:
            item = await self._items[collection].get(item_id)
        except NotFound:
            return  # deleted meanwhile
        except self._items[collection].store.errors as exc:  # the next change tells
            log.warning("cannot read %s %s again: %s", collection, item_id, exc)
            return
        obj = self._objects.get((collection, item_id))
        if obj is not None:
            obj.item = item
            obj.announce()

    # -- called by the Manager after its polkit check -----------------------------------
    async def create_schedule(self, definition: dict, uid: int) -> str:
        await require_kind_action(definition.get("kind", "export"))
        schedule = await self.automation.schedules.create(definition, uid)
        self.automation.wake()
        return self._add("schedule", schedule)

    async def create_backup_policy(self, definition: dict, uid: int) -> str:
        await require_kind_action(self.automation.policies.kind)
        policy = await self.automation.policies.create(definition, uid)
        self.automation.wake()
        return self._add("policy", policy)

    async def configure_webhook(self, definition: dict, uid: int) -> str:
        return self._add("webhook", await self.automation.webhooks.create(definition, uid))
