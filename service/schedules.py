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

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .cron import Clock, CronSpec
from .cron_items import CronItems
from .definitions import JsonObject, check_name, new_id
from .errors import AlreadyExists, InvalidArgument, NotFound

if TYPE_CHECKING:
    from .engine import JobEngine
    from .store import JobRecord, Store

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("pending", "running")
TIME_PLACEHOLDER = "{time}"


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


class Schedules(CronItems[Schedule]):
    """Schedules in the store; each fires its job definition at its cron slots."""

    table = "schedules"
    noun = "schedule"

    def __init__(self, store: "Store", engine: "JobEngine", grace: float, clock: Clock,
                 emit: Callable[[str, dict], Awaitable[int]],
                 changed: Callable[[str], None]) -> None:
        super().__init__(store, grace, clock, changed)
        self.engine = engine
        self._emit = emit  # webhook events

    # -- validation and CRUD -----------------------------------------------------------
    def validate(self, definition: Any) -> dict:
        fields = JsonObject(definition, SCHEDULE_FIELDS)
        name = check_name(fields.text("name"))
        cron = CronSpec.parse(fields.text("cron"), fields.text("timezone", ""))
        kind = fields.text("kind", "export")
        job_definition = fields.mapping("job_definition")
        try:
            self.engine.validate(kind, run_definition(job_definition, self.clock.now()))
        except InvalidArgument as exc:
            field = "kind" if exc.field == "kind" else f"job_definition.{exc.field}"
            raise InvalidArgument(field, exc.rule) from None
        return {"name": name, "cron": cron.expression, "timezone": cron.timezone, "kind": kind,
                "job_definition": job_definition, "description": fields.text("description", ""),
                "enabled": fields.flag("enabled", True)}

    async def create(self, definition: Any, uid: int) -> Schedule:
        data = self.validate(definition)
        enabled = data.pop("enabled")
        schedule_id = new_id("schedule")
        now = self.clock.now()
        async with self.store.transaction() as db:
            if (await db.execute("SELECT 1 FROM schedules WHERE name=?",
                                 (data["name"],))).fetchone():
                raise AlreadyExists(f"name: a schedule named {data['name']!r} exists")
            await db.execute("INSERT INTO schedules (id, name, definition, enabled, created_by_uid,"
                             " created_at, last_slot) VALUES (?,?,?,?,?,?,?)",
                             (schedule_id, data["name"], json.dumps(data), int(enabled), uid,
                              now, now))
        log.info("schedule %s (%s) created: %s", schedule_id, data["name"], data["cron"])
        return await self.get(schedule_id)

    async def jobs(self, schedule_id: str) -> list[str]:
        return [r[0] for r in await self.store.execute(
            "SELECT job_id FROM schedule_jobs WHERE schedule_id=? ORDER BY rowid", (schedule_id,))]

    # -- running -----------------------------------------------------------------------
    async def run_now(self, schedule_id: str, uid: int) -> "JobRecord":
        return await self._submit(await self.get(schedule_id), None, uid)

    async def _submit(self, schedule: Schedule, slot: float | None, uid: int) -> "JobRecord":
        definition = run_definition(schedule.job_definition, slot or self.clock.now())
        job = await self.engine.submit(schedule.kind, definition, uid)
        async with self.store.transaction() as db:
            await db.execute("INSERT INTO schedule_jobs (schedule_id, job_id, slot) VALUES (?,?,?)",
                             (schedule.id, job.id, slot))
            await db.execute("UPDATE schedules SET last_run=?, last_job=? WHERE id=?",
                             (self.clock.now(), job.id, schedule.id))
        await self._emit("schedule.triggered", {
            "schedule_id": schedule.id, "schedule_name": schedule.name, "job_id": job.id,
            "status": job.status, "vm": job.vm, "provider": job.provider,
            "slot": datetime.fromtimestamp(slot, timezone.utc).isoformat() if slot else None,
            "manual": slot is None})
        self._changed(schedule.id)
        return job

    # -- the tick's hooks (cron_items.py) -------------------------------------------------
    def _from_row(self, row) -> Schedule:
        return _row_to_schedule(row)

    async def _busy(self, schedule: Schedule) -> str:
        """Runs never pile up: a slot is skipped while the previous job is still going."""
        if not schedule.last_job:
            return ""
        try:
            status = (await self.engine.get(schedule.last_job)).status
        except NotFound:
            return ""
        return (f"the previous job {schedule.last_job} is still {status}"
                if status in ACTIVE_STATUSES else "")

    async def _fire(self, schedule: Schedule, slot: float) -> None:
        when = datetime.fromtimestamp(slot, timezone.utc).isoformat()
        try:
            job = await self._submit(schedule, slot, schedule.created_by_uid)
        except Exception as exc:  # a bad slot must not stop the other schedules
            log.error("schedule %s (%s): run due at %s could not be submitted: %s",
                      schedule.id, schedule.name, when, exc)
            self._changed(schedule.id)
        else:
            log.info("schedule %s (%s): run due at %s submitted as %s", schedule.id,
                     schedule.name, when, job.id)
