"""Backup policies: export every VM matching a filter, on a schedule, with retention.

A run resolves `vm_filter` through the provider's `list_vms` (so new VMs are picked
up) and submits one export job per VM; the engine's export slots bound how many run
at once. Each job writes into a directory of its own that the policy chooses and
records before submitting: `<root>/<vm name>/<UTC time>-<run>`, where root is the
policy's `export_path` or `<export.base_path>/backups/<policy name>`.

Retention runs after a successful run (every job of the run completed) and only
over the directories this policy recorded, per VM: keep the `retention.count`
newest good backups, remove those older than `retention.age_days`, and never the
newest good backup of a VM. Nothing else under the root is ever touched. A run
whose jobs failed applies no retention. Deleting a policy keeps its backups on disk.

Overlap: a run does not start while the policy's previous run has jobs pending or
running (a scheduled slot is skipped and logged; Run() is refused). Scheduling uses
the same rules as schedules (see schedules.py).

Enabled: a disabled policy is skipped by the scheduler (NextRun 0) but Run() still
runs it when asked, like a schedule's RunNow; re-enabling does not fire the slots
that passed meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .cron import Clock, CronSpec, check_timezone
from .cron_items import CronItems
from .definitions import JsonObject, check_fields, check_name, new_id
from .errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from .store import TERMINAL_STATUSES

if TYPE_CHECKING:
    from .engine import JobEngine, JobEvent
    from .store import JobRecord, Store

log = logging.getLogger(__name__)

POLICY_FIELDS = ("name", "provider", "vm_filter", "schedule", "timezone", "retention",
                 "export_options", "export_path", "enabled", "description")
RETENTION_FIELDS = ("count", "age_days")
RESERVED_EXPORT_KEYS = ("vm_identifier", "provider", "export_path")
DAY = 86400.0


@dataclass
class Backup:
    id: int
    policy_id: str
    run_id: str
    vm: str
    vm_name: str
    job_id: str
    path: str
    created_at: float
    state: str  # pending | good | failed | deleted

    def to_dict(self) -> dict:
        return {"vm": self.vm, "vm_name": self.vm_name, "job_id": self.job_id,
                "path": self.path, "created_at": self.created_at}


@dataclass
class Policy:
    id: str
    definition: dict
    enabled: bool
    created_by_uid: int
    created_at: float
    last_slot: float
    last_run: float | None
    root: Path

    @property
    def name(self) -> str:
        return self.definition["name"]

    @property
    def cron(self) -> CronSpec | None:
        expression = self.definition["schedule"]
        return CronSpec(expression, self.definition["timezone"]) if expression else None

    @property
    def next_run(self) -> float | None:
        cron = self.cron
        return cron.next_after(self.last_slot) if cron and self.enabled else None


def plan_retention(backups: list[Backup], retention: dict, now: float) -> list[Backup]:
    """The good backups retention removes: per VM, beyond `count` or older than `age_days`,
    never the newest one."""
    by_vm: dict[str, list[Backup]] = {}
    for backup in backups:
        if backup.state == "good":
            by_vm.setdefault(backup.vm, []).append(backup)
    count, age_days = retention.get("count"), retention.get("age_days")
    doomed = []
    for items in by_vm.values():
        items.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        for index, backup in enumerate(items[1:], start=1):
            too_many = count is not None and index >= count
            too_old = age_days is not None and now - backup.created_at > age_days * DAY
            if too_many or too_old:
                doomed.append(backup)
    return doomed


def _safe_component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "vm"


def _check_retention(value: Any) -> dict:
    if value is None:
        return {}
    check_fields(value, RETENTION_FIELDS, (), "retention.")
    result = {}
    count = value.get("count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidArgument("retention.count", "must be a whole number >= 1")
        result["count"] = count
    age = value.get("age_days")
    if age is not None:
        if isinstance(age, bool) or not isinstance(age, (int, float)) or age <= 0:
            raise InvalidArgument("retention.age_days", "must be a number of days > 0")
        result["age_days"] = age
    return result


class BackupPolicies(CronItems[Policy]):
    table = "backup_policies"
    noun = "backup policy"

    def __init__(self, store: "Store", engine: "JobEngine", grace: float, clock: Clock,
                 emit: Callable[[str, dict], Awaitable[int]], changed: Callable[[str], None],
                 kind: str = "export") -> None:
        """`kind` is the job kind each VM's backup runs as (tests pass their own)."""
        super().__init__(store, grace, clock, changed)
        self.engine = engine
        self.config = engine.config
        self.kind = kind
        self._emit = emit
        self._tasks: set[asyncio.Task] = set()

    # -- validation and CRUD -----------------------------------------------------------
    def validate(self, definition: Any) -> dict:
        fields = JsonObject(definition, POLICY_FIELDS)
        name = check_name(fields.text("name"))
        only = next(iter(self.config.providers)) if len(self.config.providers) == 1 else ""
        provider = fields.text("provider", only)
        if not provider:
            raise InvalidArgument("provider", "is required when the config does not define "
                                              "exactly one provider")
        vm_filter = fields.mapping("vm_filter", {})
        tz_name = check_timezone(definition.get("timezone"))
        schedule = fields.text("schedule", "")
        if schedule:
            schedule = CronSpec.parse(schedule, tz_name, field="schedule").expression
        export_path = fields.text("export_path", "")
        if export_path and not export_path.startswith("/"):
            raise InvalidArgument("export_path", "must be an absolute directory path")
        data = {"name": name, "provider": provider, "vm_filter": vm_filter,
                "schedule": schedule, "timezone": tz_name,
                "retention": _check_retention(definition.get("retention")),
                "export_path": export_path, "description": fields.text("description", "")}
        root = self._root(data)
        data["export_options"] = self._check_export_options(definition.get("export_options"),
                                                            provider, root)
        fields.flag("enabled", True)
        return data

    def _check_export_options(self, options: Any, provider: str, root: Path) -> dict:
        options = options or {}
        if not isinstance(options, dict):
            raise InvalidArgument("export_options", "must be a JSON object")
        for key in RESERVED_EXPORT_KEYS:
            if key in options:
                raise InvalidArgument(f"export_options.{key}", "is set by the policy for each VM")
        probe = {**options, "vm_identifier": "probe", "provider": provider,
                 "export_path": str(root / "probe")}
        try:
            self.engine.validate(self.kind, probe)
        except InvalidArgument as exc:
            field = exc.field if exc.field in ("kind", *RESERVED_EXPORT_KEYS) else \
                f"export_options.{exc.field}"
            raise InvalidArgument(field, exc.rule) from None
        return options

    async def create(self, definition: Any, uid: int) -> Policy:
        data = self.validate(definition)
        enabled = definition.get("enabled", True)
        policy_id = new_id("policy")
        now = self.clock.now()
        async with self.store.transaction() as db:
            if (await db.execute("SELECT 1 FROM backup_policies WHERE name=?",
                                 (data["name"],))).fetchone():
                raise AlreadyExists(f"name: a backup policy named {data['name']!r} exists")
            await db.execute("INSERT INTO backup_policies (id, name, definition, enabled,"
                             " created_by_uid, created_at, last_slot) VALUES (?,?,?,?,?,?,?)",
                             (policy_id, data["name"], json.dumps(data), int(enabled), uid, now,
                              now))
        log.info("backup policy %s (%s) created", policy_id, data["name"])
        return await self.get(policy_id)

    def _root(self, definition: dict) -> Path:
        return Path(definition["export_path"] or
                    Path(self.config.export.base_path) / "backups" / definition["name"])

    def _from_row(self, row) -> Policy:
        definition = json.loads(row["definition"])
        return Policy(id=row["id"], definition=definition, enabled=bool(row["enabled"]),
                      created_by_uid=row["created_by_uid"], created_at=row["created_at"],
                      last_slot=row["last_slot"], last_run=row["last_run"],
                      root=self._root(definition))

    async def backups(self, policy_id: str, states: tuple[str, ...] = ("pending", "good", "failed")
                ) -> list[Backup]:
        marks = ",".join("?" * len(states))
        return [Backup(**{k: r[k] for k in Backup.__dataclass_fields__}) for r in
                await self.store.execute(f"SELECT * FROM backups WHERE policy_id=? AND state IN"
                                         f" ({marks}) ORDER BY created_at, id",
                                         (policy_id, *states))]

    # -- runs --------------------------------------------------------------------------
    async def _active(self, policy_id: str) -> bool:
        return bool(await self.backups(policy_id, ("pending",)))

    async def _matching_vms(self, policy: Policy) -> list:
        provider = await self.engine.providers.get(policy.definition["provider"])
        return await provider.list_vms(dict(policy.definition["vm_filter"]))

    async def run(self, policy_id: str, uid: int) -> list["JobRecord"]:
        """Submit one export job per matching VM; Unavailable while a run is going."""
        policy = await self.get(policy_id)
        if await self._active(policy.id):
            raise Unavailable(f"backup policy {policy.name}: the previous run is still going")
        vms = await self._matching_vms(policy)
        if await self._active(policy.id):  # another run started while we asked the provider
            raise Unavailable(f"backup policy {policy.name}: the previous run is still going")
        now = self.clock.now()
        run_id = new_id("run")
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        planned = []
        for vm in vms:
            path = policy.root / _safe_component(vm.name or vm.identifier) / \
                f"{stamp}-{run_id[-6:]}"
            definition = {**policy.definition["export_options"], "vm_identifier": vm.identifier,
                          "provider": policy.definition["provider"], "export_path": str(path)}
            self.engine.validate(self.kind, definition)
            planned.append((vm, path, definition))
        jobs = []
        for vm, path, definition in planned:
            job = await self.engine.submit(self.kind, definition, uid)
            await self.store.execute("INSERT INTO backups (policy_id, run_id, vm, vm_name, job_id,"
                                     " path, created_at, state) VALUES (?,?,?,?,?,?,?, 'pending')",
                                     (policy.id, run_id, vm.identifier, vm.name, job.id, str(path),
                                      now))
            jobs.append(job)
        await self.store.execute("UPDATE backup_policies SET last_run=? WHERE id=?",
                                 (now, policy.id))
        log.info("backup policy %s (%s): run %s submitted %d export jobs", policy.id,
                 policy.name, run_id, len(jobs))
        self._changed(policy.id)
        return jobs

    async def dry_run(self, policy_id: str) -> dict:
        """What Run would export now, and what retention would delete if it succeeded."""
        policy = await self.get(policy_id)
        vms = await self._matching_vms(policy)
        now = self.clock.now()
        existing = await self.backups(policy.id, ("good",))
        future = [Backup(-1, policy.id, "dry-run", vm.identifier, vm.name, "", "", now, "good")
                  for vm in vms]
        doomed = plan_retention(existing + future, policy.definition["retention"], now)
        return {"policy_id": policy.id, "provider": policy.definition["provider"],
                "vms": [{"identifier": vm.identifier, "name": vm.name} for vm in vms],
                "retention_would_delete": [b.to_dict() for b in doomed if b.id >= 0]}

    # -- job completion and retention --------------------------------------------------
    def on_job_event(self, event: "JobEvent") -> Awaitable[None] | None:
        """Engine listener: mark the backup good or failed; apply retention when a run ends."""
        if not event.local or event.type != "status" or \
                event.job.status not in TERMINAL_STATUSES:
            return None  # the instance that ended the job settles it (fleet.py)
        return self._job_ended(event.job)

    async def _job_ended(self, job: "JobRecord") -> None:
        row = (await self.store.execute("SELECT policy_id, run_id FROM backups WHERE job_id=?"
                                        " AND state='pending'", (job.id,))).fetchone()
        if row is None:
            return
        await self._settle(job.id, job.status)
        await self._run_finished(row["policy_id"], row["run_id"])

    async def _settle(self, job_id: str, status: str) -> None:
        await self.store.execute("UPDATE backups SET state=? WHERE job_id=? AND state='pending'",
                                 ("good" if status == "completed" else "failed", job_id))

    async def _run_finished(self, policy_id: str, run_id: str) -> None:
        states = [r[0] for r in await self.store.execute(
            "SELECT state FROM backups WHERE policy_id=? AND run_id=?", (policy_id, run_id))]
        if "pending" in states:
            return
        self._changed(policy_id)
        if states and all(s == "good" for s in states):
            self._spawn(self.apply_retention(policy_id, run_id))
        else:
            log.warning("backup policy %s: run %s had failed jobs; no retention applied",
                        policy_id, run_id)

    async def reconcile(self) -> None:
        """At start: settle backups whose jobs ended while no one was listening."""
        pending = (await self.store.execute("SELECT b.job_id, b.policy_id, b.run_id, j.status FROM"
                                            " backups b LEFT JOIN jobs j ON j.id = b.job_id WHERE"
                                            " b.state='pending'")).fetchall()
        for job_id, policy_id, run_id, status in pending:
            if status is None or status in TERMINAL_STATUSES:
                await self._settle(job_id, status or "failed")
                await self._run_finished(policy_id, run_id)

    async def apply_retention(self, policy_id: str, run_id: str = "") -> list[Backup]:
        try:
            policy = await self.get(policy_id)
        except NotFound:
            return []  # deleted meanwhile: its backups are kept
        doomed = plan_retention(await self.backups(policy.id, ("good",)),
                                policy.definition["retention"], self.clock.now())
        deleted = []
        for backup in doomed:
            if await asyncio.to_thread(self._remove, policy.root, Path(backup.path)):
                await self.store.execute("UPDATE backups SET state='deleted', deleted_at=?"
                                         " WHERE id=?", (self.clock.now(), backup.id))
                deleted.append(backup)
        kept = len(await self.backups(policy.id, ("good",)))
        log.info("backup policy %s (%s): retention removed %d backups, %d kept", policy.id,
                 policy.name, len(deleted), kept)
        await self._emit("backup.retention_applied", {
            "policy_id": policy.id, "policy_name": policy.name, "run_id": run_id,
            "deleted": [b.to_dict() for b in deleted], "kept": kept})
        return deleted

    @staticmethod
    def _remove(root: Path, path: Path) -> bool:
        """Remove one recorded backup directory, refusing anything outside the root."""
        resolved_root = root.resolve()
        parent = path.parent.resolve()
        if parent != resolved_root and resolved_root not in parent.parents:
            log.error("retention: %s is outside the policy's root %s; not removed", path, root)
            return False
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        except OSError as exc:
            log.error("retention: could not remove %s: %s", path, exc.strerror)
            return False
        return True

    # -- the tick's hooks (cron_items.py) -------------------------------------------------
    async def _busy(self, policy: Policy) -> str:
        return "the previous run is still going" if await self._active(policy.id) else ""

    async def _fire(self, policy: Policy, slot: float) -> None:
        self._spawn(self._scheduled_run(policy))
        self._changed(policy.id)

    async def _scheduled_run(self, policy: Policy) -> None:
        try:
            await self.run(policy.id, policy.created_by_uid)
        except Exception as exc:
            log.error("backup policy %s (%s): scheduled run failed: %s", policy.id,
                      policy.name, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
