"""Automation: schedules, backup policies and webhooks behind one facade.

The daemon creates it after the engine and before `engine.start()` (so it hears
every job event), starts it after the engine has recovered its jobs, and stops it
before the engine shuts down. Two background tasks run: the scheduler (fires
schedules and policies at their cron slots) and the webhook deliverer. Plain
asyncio, no D-Bus: `dbus/automation.py` puts objects on the bus and listens to
`on_change` to announce property changes.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from .backup_policies import BackupPolicies
from .cron import Clock, SystemClock, wait_until
from .schedules import Schedules
from .webhooks import Webhooks

if TYPE_CHECKING:
    from .config import Config
    from .engine import JobEngine
    from .store import Store

log = logging.getLogger(__name__)

ChangeListener = Callable[[str, str], None]  # (collection, id): "schedule"|"policy"|"webhook"


class Automation:
    def __init__(self, store: "Store", engine: "JobEngine", config: "Config",
                 clock: Clock | None = None, backup_kind: str = "export") -> None:
        self.clock = clock or SystemClock()
        settings = config.automation
        self.on_change: list[ChangeListener] = []
        self.webhooks = Webhooks(store, settings, self.clock,
                                 changed=lambda item: self._changed("webhook", item))
        self.schedules = Schedules(store, engine, settings.missed_run_grace, self.clock,
                                   emit=self.webhooks.emit,
                                   changed=lambda item: self._changed("schedule", item))
        self.policies = BackupPolicies(store, engine, settings.missed_run_grace, self.clock,
                                       emit=self.webhooks.emit,
                                       changed=lambda item: self._changed("policy", item),
                                       kind=backup_kind)
        self._config_webhooks = config.webhooks
        engine.subscribe(self.webhooks.on_job_event)
        engine.subscribe(self.policies.on_job_event)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def _changed(self, collection: str, item_id: str) -> None:
        for listener in self.on_change:
            try:
                listener(collection, item_id)
            except Exception:
                log.exception("automation change listener failed")

    def wake(self) -> None:
        """Schedules changed: recompute when the scheduler must wake up."""
        self._wake.set()

    async def load(self) -> None:
        """Make the config file's webhooks current (before their objects are exported)."""
        await self.webhooks.load_config(self._config_webhooks)

    async def start(self) -> None:
        await self.policies.reconcile()
        self._tasks = [asyncio.create_task(self._scheduler(), name="scheduler"),
                       asyncio.create_task(self.webhooks.run(), name="webhooks")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.policies.close()

    async def _scheduler(self) -> None:
        while True:
            try:
                await self.schedules.tick()
                await self.policies.tick()
                dues = [d for d in (await self.schedules.next_due(),
                                    await self.policies.next_due()) if d is not None]
            except Exception:  # a bug must not stop every schedule: log and try later
                log.exception("scheduler tick failed")
                dues = []
            await wait_until(self.clock, min(dues, default=None), self._wake)
