"""Things that run on a cron schedule and live in a store table: schedules and backup
policies. One repository-and-tick shape for both.

Each row has `id`, `enabled`, `last_slot` (the latest cron slot dealt with, fired or
skipped), `last_run` and `created_by_uid`. A tick decides, per enabled item with a cron,
whether a slot has come (cron.decide). The slot is claimed in the store first, by a
conditional UPDATE whose row count must be 1, so that whatever happens next the slot is
never fired twice (a second instance or a concurrent change loses the claim and decides
again on the next tick). Then the item fires, unless the slot was missed by more than
the grace period or the item's previous run is still going (`busy`): both are logged.

Enabling never fires the slots that passed while the item was disabled: counting starts
again from the moment it is enabled.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Generic, Protocol, TypeVar

from .cron import Clock, CronSpec, decide
from .errors import NotFound

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)


class CronItem(Protocol):
    id: str
    enabled: bool
    last_slot: float
    created_by_uid: int

    @property
    def name(self) -> str: ...

    @property
    def cron(self) -> CronSpec | None: ...

    @property
    def next_run(self) -> float | None:  # the next slot, None while disabled
        ...


Item = TypeVar("Item", bound=CronItem)


class CronItems(ABC, Generic[Item]):
    """The rows of `table`, each an `Item`; see the module docstring."""

    table: str = ""
    noun: str = ""  # what users call one: "schedule", "backup policy"

    def __init__(self, store: "Store", grace: float, clock: Clock,
                 changed: Callable[[str], None]) -> None:
        self.store = store
        self.grace = grace
        self.clock = clock
        self._changed = changed  # an item's properties changed (D-Bus announces it)

    # -- what each kind says -------------------------------------------------------------
    @abstractmethod
    def _from_row(self, row) -> Item: ...

    @abstractmethod
    async def _busy(self, item: Item) -> str:
        """Why a slot must be skipped because the item's previous run is going; "" if not."""

    @abstractmethod
    async def _fire(self, item: Item, slot: float) -> None:
        """Run the item for `slot` (announcing its changes)."""

    # -- the repository --------------------------------------------------------------------
    async def get(self, item_id: str) -> Item:
        row = (await self.store.execute(f"SELECT * FROM {self.table} WHERE id=?",
                                        (item_id,))).fetchone()
        if row is None:
            raise NotFound(f"no {self.noun} {item_id!r}")
        return self._from_row(row)

    async def list(self) -> list[Item]:
        return [self._from_row(row) for row in
                await self.store.execute(f"SELECT * FROM {self.table} ORDER BY created_at, id")]

    async def set_enabled(self, item_id: str, enabled: bool) -> Item:
        item = await self.get(item_id)
        if item.enabled != enabled:
            await self.store.execute(f"UPDATE {self.table} SET enabled=?, last_slot=? WHERE id=?",
                                     (int(enabled), max(item.last_slot, self.clock.now()), item_id))
            log.info("%s %s (%s) %s", self.noun, item_id, item.name,
                     "enabled" if enabled else "disabled")
            self._changed(item_id)
        return await self.get(item_id)

    async def delete(self, item_id: str) -> None:
        await self.get(item_id)
        await self.store.execute(f"DELETE FROM {self.table} WHERE id=?", (item_id,))
        log.info("%s %s deleted", self.noun, item_id)

    # -- the tick ------------------------------------------------------------------------
    async def tick(self) -> None:
        """Fire or skip every enabled item whose slot has come."""
        now = self.clock.now()
        for item in await self.list():
            if item.enabled and item.cron is not None:
                try:
                    await self._tick_one(item, now)
                except Exception:  # one broken item must not stop the others
                    log.exception("%s %s: tick failed", self.noun, item.id)

    async def _tick_one(self, item: Item, now: float) -> None:
        decision = decide(item.cron, item.last_slot, now, self.grace)
        if decision is None:
            return
        async with self.store.transaction() as db:
            claimed = (await db.execute(
                f"UPDATE {self.table} SET last_slot=? WHERE id=? AND last_slot=?",
                (decision.slot, item.id, item.last_slot))).rowcount
        if not claimed:
            return  # changed meanwhile (deleted, re-enabled): decide again on the next tick
        when = datetime.fromtimestamp(decision.slot, timezone.utc).isoformat()
        label = f"{self.noun} {item.id} ({item.name})"
        if decision.missed_earlier:
            log.warning("%s: earlier missed runs were skipped", label)
        if not decision.fire:
            log.warning("%s: run due at %s was missed by more than the grace period (%gs); "
                        "skipped", label, when, self.grace)
        elif busy := await self._busy(item):
            log.warning("%s: run due at %s skipped: %s", label, when, busy)
        else:
            await self._fire(item, decision.slot)
            return
        self._changed(item.id)

    async def next_due(self) -> float | None:
        slots = [item.next_run for item in await self.list()]
        return min((slot for slot in slots if slot is not None), default=None)
