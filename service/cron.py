"""Cron time: expressions in a time zone, the slots they give, what to do at a moment,
and the clock the automation reads "now" from.

Rules (documented for users in org.hypersdk.HyperSDK1.Schedule.xml and schedules.py):
a standard 5-field expression or a name such as `@daily`, or 6 fields with croniter's
seconds; an IANA zone or the host's; after an outage only the latest missed slot
counts, once, within the grace period; in a fall-back hour a fixed-hour expression
fires only at the first occurrence.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .errors import InvalidArgument


class Clock(Protocol):
    """Where the scheduler gets "now" (seconds since the epoch); tests pass their own."""

    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


def host_timezone() -> ZoneInfo:
    """The host's IANA zone: $TZ, else /etc/localtime's target, else /etc/timezone, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        target = str(localtime.resolve())
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def check_timezone(value: Any, field: str = "timezone") -> str:
    """An IANA zone name, or "" for the host's zone."""
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be an IANA time zone name such as 'Europe/Berlin'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(field, f"unknown IANA time zone {value!r}") from None
    return value


@dataclass(frozen=True)
class CronSpec:
    """A validated cron expression in a time zone ("" = the host's)."""

    expression: str
    timezone: str = ""

    @classmethod
    def parse(cls, expression: Any, tz_name: Any = "", field: str = "cron",
              tz_field: str = "timezone") -> "CronSpec":
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidArgument(field, "must be a cron expression such as '0 2 * * *' or "
                                         "'@daily'")
        expression = " ".join(expression.split())
        fields = expression.split(" ")
        if not expression.startswith("@") and len(fields) not in (5, 6):
            raise InvalidArgument(field, f"{expression!r} has {len(fields)} fields; expected 5 "
                                         "(minute hour day month weekday) or 6 (plus seconds)")
        if not croniter.is_valid(expression):
            raise InvalidArgument(field, f"{expression!r} is not a valid cron expression")
        spec = cls(expression, check_timezone(tz_name, tz_field))
        try:
            spec.next_after(time.time())
        except CroniterError:
            raise InvalidArgument(field, f"{expression!r} never matches a date") from None
        return spec

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone) if self.timezone else host_timezone()

    def _hourly(self) -> bool:
        fields = self.expression.split(" ")
        return self.expression == "@hourly" or (len(fields) >= 5 and fields[1] == "*")

    def _accept(self, slot: datetime) -> bool:
        """False for the second occurrence of a repeated (fall-back) wall time, see above."""
        if self._hourly():
            return True
        naive = slot.replace(tzinfo=None)
        first = naive.replace(tzinfo=slot.tzinfo, fold=0).utcoffset()
        second = naive.replace(tzinfo=slot.tzinfo, fold=1).utcoffset()
        return first == second or slot.utcoffset() == first

    def _slots(self, start: float, forward: bool) -> Iterator[float]:
        zone = self.zone
        it = croniter(self.expression, datetime.fromtimestamp(start, zone))
        step = it.get_next if forward else it.get_prev
        while True:
            slot = step(datetime)
            if self._accept(slot):
                yield slot.timestamp()

    def next_after(self, moment: float) -> float:
        """The first slot strictly after `moment`."""
        for slot in self._slots(moment, forward=True):
            if slot > moment:
                return slot
        raise AssertionError("unreachable")

    def latest_until(self, moment: float) -> float:
        """The last slot at or before `moment`."""
        for slot in self._slots(float(int(moment) + 1), forward=False):
            if slot <= moment:
                return slot
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class SlotDecision:
    slot: float          # the slot dealt with; becomes last_slot
    fire: bool           # False: skipped because it is older than the grace period
    missed_earlier: bool  # older slots passed unseen (skipped)


def decide(spec: CronSpec, last_slot: float, now: float, grace: float) -> SlotDecision | None:
    """What to do at `now` for a trigger whose latest handled slot is `last_slot`."""
    due = spec.next_after(last_slot)
    if due > now:
        return None
    latest = spec.latest_until(now)
    return SlotDecision(latest, now - latest <= grace, latest > due)


async def wait_until(clock: Clock, moment: float | None, wake: asyncio.Event,
                     longest: float = 30.0) -> None:
    """Sleep until `moment` (capped to `longest`) or until `wake` is set."""
    delay = longest if moment is None else min(longest, max(0.0, moment - clock.now()))
    # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives as
    # the event is set, and the loop would never stop.
    waiter = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({waiter}, timeout=delay)
    finally:
        waiter.cancel()
    wake.clear()
