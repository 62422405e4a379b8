"""Cron schedules: a job definition submitted as a normal job at each cron slot.

Rules (documented for users in org.hypersdk.HyperSDK1.Schedule.xml):

- `cron` is a standard 5-field expression or a name such as `@daily`, parsed by
  croniter; a 6th field, croniter's seconds, is accepted too (`* * * * * */10` =
  every 10 s). `timezone` is an IANA name; without it the host's zone is used.
- Each schedule remembers `last_slot`, the latest cron slot it has dealt with (fired
  or skipped). It is written in the same transaction that decides a slot, *before*
  the job is submitted: a crash can lose one run but can never run a slot twice.
- Missed runs: when slots passed while the service was down, only the latest one
  counts. It fires once if it is at most `automation.missed_run_grace` old, else it
  is skipped and logged. Older missed slots are skipped and logged.
- Overlap: when a slot comes while the schedule's previous job is still pending or
  running, the slot is skipped and logged; runs never pile up. RunNow always submits.
- Daylight saving: a slot inside the hour skipped by a spring-forward runs when the
  clocks resume (croniter's rule); in the hour repeated by a fall-back, a schedule
  with a fixed hour fires only at the first occurrence, while one whose hour field is
  `*` keeps firing by elapsed time.
- Re-enabling a schedule does not fire the slots that passed while it was disabled.
- Each run lands in a directory of its own: an `export_path` without `{time}` gets
  `/{time}` appended, so the spec's `"export_path": "/exports/nightly"` writes its run
  of 2 January 2026 02:00 UTC into `/exports/nightly/20260102T020000Z/` (an export
  refuses to overwrite, so a fixed path would make every run after the first fail).
  The job's definition shows the run's path.
- `{time}` in any string of the job definition becomes the run's UTC time
  (`20260102T020000Z`), e.g. `"export_path": "nightly/{time}/disks"` to choose where.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .definitions import check_fields
from .errors import AlreadyExists, InvalidArgument, NotFound

if TYPE_CHECKING:
    from .engine import JobEngine
    from .store import JobRecord, Store

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("pending", "running")
TIME_PLACEHOLDER = "{time}"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


# -- time ------------------------------------------------------------------------------
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


# -- validation helpers shared by schedules and backup policies --------------------------


def check_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidArgument(field, "1-128 letters, digits, spaces, '.', '_' or '-', "
                                     "starting with a letter or digit")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, "must be true or false")
    return value


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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def store_enabled(store: "Store", table: str, item_id: str, enabled: bool,
                  last_slot: float, now: float) -> None:
    """Enable or disable a cron-driven row (a schedule or a backup policy).

    Slots that passed while it was disabled are not "missed": counting starts again
    from now, so re-enabling never fires them.
    """
    store.execute(f"UPDATE {table} SET enabled=?, last_slot=? WHERE id=?",
                  (int(enabled), max(last_slot, now), item_id))


# -- cron ------------------------------------------------------------------------------
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


def run_definition(job_definition: dict, moment: float) -> dict:
    """What a run at `moment` submits: its own directory under `export_path` (`/{time}`
    appended unless the path places `{time}` itself), every `{time}` expanded."""
    path = job_definition.get("export_path")
    if isinstance(path, str) and path and TIME_PLACEHOLDER not in path:
        job_definition = {**job_definition,
                          "export_path": f"{path.rstrip('/')}/{TIME_PLACEHOLDER}"}
    return expand_time(job_definition, moment)


def expand_time(value: Any, moment: float) -> Any:
    """`{time}` in any string of a job definition -> the run's UTC time, 20260102T020000Z.

    So that each run of, say, a nightly export can write to a directory of its own.
    """
    if isinstance(value, str):
        return value.replace(TIME_PLACEHOLDER, datetime.fromtimestamp(
            moment, timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    if isinstance(value, dict):
        return {k: expand_time(v, moment) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_time(v, moment) for v in value]
    return value


# -- schedules -------------------------------------------------------------------------
SCHEDULE_FIELDS = ("name", "cron", "timezone", "kind", "job_definition", "enabled",
                   "description")


@dataclass
class Schedule:
    id: str
    name: str
    cron: CronSpec
    kind: str
    job_definition: dict
    description: str
    enabled: bool
    created_by_uid: int
    created_at: float
    last_slot: float
    last_run: float | None
    last_job: str | None

    @property
    def next_run(self) -> float | None:
        return self.cron.next_after(self.last_slot) if self.enabled else None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "cron": self.cron.expression,
                "timezone": self.cron.timezone, "kind": self.kind,
                "job_definition": self.job_definition, "description": self.description,
                "enabled": self.enabled}


def _row_to_schedule(row) -> Schedule:
    data = json.loads(row["definition"])
    return Schedule(id=row["id"], name=data["name"],
                    cron=CronSpec(data["cron"], data["timezone"]), kind=data["kind"],
                    job_definition=data["job_definition"], description=data["description"],
                    enabled=bool(row["enabled"]), created_by_uid=row["created_by_uid"],
                    created_at=row["created_at"], last_slot=row["last_slot"],
                    last_run=row["last_run"], last_job=row["last_job"])


class Schedules:
    """Schedules in the store, and the decision of what to fire at a given moment."""

    def __init__(self, store: "Store", engine: "JobEngine", grace: float, clock: Clock,
                 emit: Callable[[str, dict], None], changed: Callable[[str], None]) -> None:
        self.store = store
        self.engine = engine
        self.grace = grace
        self.clock = clock
        self._emit = emit          # webhook events
        self._changed = changed    # an object's properties changed

    # -- validation and CRUD -----------------------------------------------------------
    def validate(self, definition: Any) -> dict:
        check_fields(definition, SCHEDULE_FIELDS, ("name", "cron", "job_definition"))
        name = check_name(definition["name"])
        cron = CronSpec.parse(definition["cron"], definition.get("timezone", ""))
        kind = definition.get("kind", "export")
        if not isinstance(kind, str) or not kind:
            raise InvalidArgument("kind", "must be a job kind name such as 'export'")
        job_definition = definition["job_definition"]
        if not isinstance(job_definition, dict):
            raise InvalidArgument("job_definition", "must be a JSON object")
        try:
            self.engine.validate(kind, run_definition(job_definition, self.clock.now()))
        except InvalidArgument as exc:
            field = "kind" if exc.field == "kind" else f"job_definition.{exc.field}"
            raise InvalidArgument(field, exc.rule) from None
        description = definition.get("description", "")
        if not isinstance(description, str):
            raise InvalidArgument("description", "must be a string")
        return {"name": name, "cron": cron.expression, "timezone": cron.timezone, "kind": kind,
                "job_definition": job_definition, "description": description,
                "enabled": check_bool(definition.get("enabled", True), "enabled")}

    def create(self, definition: Any, uid: int) -> Schedule:
        data = self.validate(definition)
        enabled = data.pop("enabled")
        schedule_id = new_id("schedule")
        now = self.clock.now()
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM schedules WHERE name=?", (data["name"],)).fetchone():
                raise AlreadyExists(f"name: a schedule named {data['name']!r} exists")
            db.execute("INSERT INTO schedules (id, name, definition, enabled, created_by_uid,"
                       " created_at, last_slot) VALUES (?,?,?,?,?,?,?)",
                       (schedule_id, data["name"], json.dumps(data), int(enabled), uid, now, now))
        log.info("schedule %s (%s) created: %s", schedule_id, data["name"], data["cron"])
        return self.get(schedule_id)

    def get(self, schedule_id: str) -> Schedule:
        row = self.store.execute("SELECT * FROM schedules WHERE id=?", (schedule_id,)).fetchone()
        if row is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return _row_to_schedule(row)

    def list(self) -> list[Schedule]:
        return [_row_to_schedule(r) for r in
                self.store.execute("SELECT * FROM schedules ORDER BY created_at, id")]

    def set_enabled(self, schedule_id: str, enabled: bool) -> Schedule:
        schedule = self.get(schedule_id)
        if schedule.enabled != enabled:
            store_enabled(self.store, "schedules", schedule_id, enabled, schedule.last_slot,
                          self.clock.now())
            self._changed(schedule_id)
        return self.get(schedule_id)

    def delete(self, schedule_id: str) -> None:
        self.get(schedule_id)
        self.store.execute("DELETE FROM schedules WHERE id=?", (schedule_id,))
        log.info("schedule %s deleted", schedule_id)

    def jobs(self, schedule_id: str) -> list[str]:
        return [r[0] for r in self.store.execute(
            "SELECT job_id FROM schedule_jobs WHERE schedule_id=? ORDER BY rowid", (schedule_id,))]

    # -- running -----------------------------------------------------------------------
    def run_now(self, schedule_id: str, uid: int) -> "JobRecord":
        return self._submit(self.get(schedule_id), None, uid)

    def _submit(self, schedule: Schedule, slot: float | None, uid: int) -> "JobRecord":
        definition = run_definition(schedule.job_definition, slot or self.clock.now())
        job = self.engine.submit(schedule.kind, definition, uid)
        with self.store.transaction() as db:
            db.execute("INSERT INTO schedule_jobs (schedule_id, job_id, slot) VALUES (?,?,?)",
                       (schedule.id, job.id, slot))
            db.execute("UPDATE schedules SET last_run=?, last_job=? WHERE id=?",
                       (self.clock.now(), job.id, schedule.id))
        self._emit("schedule.triggered", {
            "schedule_id": schedule.id, "schedule_name": schedule.name, "job_id": job.id,
            "status": job.status, "vm": job.vm, "provider": job.provider,
            "slot": datetime.fromtimestamp(slot, timezone.utc).isoformat() if slot else None,
            "manual": slot is None})
        self._changed(schedule.id)
        return job

    def _previous_job_active(self, schedule: Schedule) -> bool:
        if not schedule.last_job:
            return False
        try:
            return self.engine.get(schedule.last_job).status in ACTIVE_STATUSES
        except NotFound:
            return False

    def tick(self) -> None:
        """Fire or skip every enabled schedule whose slot has come."""
        now = self.clock.now()
        for schedule in self.list():
            if schedule.enabled:
                try:
                    self._tick_one(schedule, now)
                except Exception:  # one broken schedule must not stop the others
                    log.exception("schedule %s: tick failed", schedule.id)

    def _tick_one(self, schedule: Schedule, now: float) -> None:
        decision = decide(schedule.cron, schedule.last_slot, now, self.grace)
        if decision is None:
            return
        # Record the slot first: whatever happens next, this slot is never fired again.
        with self.store.transaction() as db:
            claimed = db.execute("UPDATE schedules SET last_slot=? WHERE id=? AND last_slot=?",
                                 (decision.slot, schedule.id, schedule.last_slot)).rowcount
        if not claimed:
            return  # changed meanwhile (deleted, re-enabled): decide again on the next tick
        when = datetime.fromtimestamp(decision.slot, timezone.utc).isoformat()
        if decision.missed_earlier:
            log.warning("schedule %s (%s): earlier missed runs were skipped", schedule.id,
                        schedule.name)
        if not decision.fire:
            log.warning("schedule %s (%s): run due at %s was missed by more than the grace "
                        "period (%gs); skipped", schedule.id, schedule.name, when, self.grace)
        elif self._previous_job_active(schedule):
            log.warning("schedule %s (%s): run due at %s skipped: the previous job %s is still "
                        "%s", schedule.id, schedule.name, when, schedule.last_job,
                        self.engine.get(schedule.last_job).status)
        else:
            try:
                job = self._submit(schedule, decision.slot, schedule.created_by_uid)
            except Exception as exc:  # a bad slot must not stop the other schedules
                log.error("schedule %s (%s): run due at %s could not be submitted: %s",
                          schedule.id, schedule.name, when, exc)
            else:
                log.info("schedule %s (%s): run due at %s submitted as %s", schedule.id,
                         schedule.name, when, job.id)
                return
        self._changed(schedule.id)

    def next_due(self) -> float | None:
        dues = [s.next_run for s in self.list() if s.enabled]
        return min((d for d in dues if d is not None), default=None)


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
