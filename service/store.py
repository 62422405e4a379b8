"""The SQLite store: the one source of truth for jobs and automation.

WAL mode, foreign keys on, `PRAGMA user_version` as the schema version, and an ordered
list of migrations applied in one transaction each at open. Every call is awaited, the
same on both engines (pgstore.py: PostgreSQL through psycopg's AsyncConnection, where a
call waits on the network without stalling the event loop); SQLite's calls are short (a
row or two, a local file) and run on the event loop thread. Each store has one
connection, and its calls take turns on it in the order they were made (Turns), so a
statement never lands inside another coroutine's transaction. Progress is written at
most once a second per job by the engine, not per chunk.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import Failed, NotFound
from .model import Checkpoint, SavedDownload
from .staging import OwnedPath

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: jobs, their status history and log lines
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('pending', 'running', 'completed', 'failed', 'cancelled')),
        definition TEXT NOT NULL,
        vm TEXT NOT NULL DEFAULT '',
        provider TEXT NOT NULL DEFAULT '',
        started_by_uid INTEGER NOT NULL DEFAULT -1,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        stage TEXT NOT NULL DEFAULT '',
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '',
        result TEXT NOT NULL DEFAULT '{}',
        retry_of TEXT REFERENCES jobs(id) ON DELETE SET NULL
    );
    CREATE INDEX jobs_status ON jobs(status, created_at);
    CREATE TABLE job_status_history (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        time REAL NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE job_logs (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        time REAL NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX job_logs_job ON job_logs(job_id, id);
    """,
    # 2: automation: schedules and their jobs, backup policies and the backups they made,
    # webhooks with a persisted outbox and a delivery log (service/automation.py)
    """
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        created_by_uid INTEGER NOT NULL DEFAULT -1,
        created_at REAL NOT NULL,
        last_slot REAL NOT NULL,
        last_run REAL,
        last_job TEXT
    );
    CREATE TABLE schedule_jobs (
        schedule_id TEXT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        slot REAL,
        PRIMARY KEY (schedule_id, job_id)
    );
    CREATE TABLE backup_policies (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        created_by_uid INTEGER NOT NULL DEFAULT -1,
        created_at REAL NOT NULL,
        last_slot REAL NOT NULL,
        last_run REAL
    );
    CREATE TABLE backups (
        id INTEGER PRIMARY KEY,
        policy_id TEXT NOT NULL REFERENCES backup_policies(id) ON DELETE CASCADE,
        run_id TEXT NOT NULL,
        vm TEXT NOT NULL,
        vm_name TEXT NOT NULL DEFAULT '',
        job_id TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'good', 'failed', 'deleted')),
        deleted_at REAL
    );
    CREATE INDEX backups_job ON backups(job_id);
    CREATE INDEX backups_policy ON backups(policy_id, vm, created_at);
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        headers TEXT NOT NULL DEFAULT '{}',
        secret TEXT NOT NULL DEFAULT '',
        enabled INTEGER NOT NULL DEFAULT 1,
        source TEXT NOT NULL CHECK (source IN ('api', 'config')),
        created_by_uid INTEGER NOT NULL DEFAULT -1,
        created_at REAL NOT NULL
    );
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY,
        webhook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
        event TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed'))
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox(state, next_attempt);
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY,
        webhook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
        outbox_id INTEGER NOT NULL,
        event TEXT NOT NULL,
        time REAL NOT NULL,
        attempt INTEGER NOT NULL,
        status_code INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '',
        duration REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, id);
    """,
    # 3: who asked for a job (a REST principal through the bridge, or a Unix user), and
    # what each job has made on disk so far (service/staging.py), for cleanup after a crash
    """
    ALTER TABLE jobs ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';
    CREATE TABLE job_paths (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('staging', 'file', 'dir')),
        root TEXT NOT NULL,
        relative TEXT NOT NULL,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL
    );
    CREATE INDEX job_paths_job ON job_paths(job_id, id);
    """,
    # 4: jobs listed oldest first (ListJobRecords, REST /jobs) page through the index
    # instead of sorting every stored job: at 50,000 jobs the last page of 100 took 97 ms
    # and now takes 2.5 ms (bench/scale.py)
    """
    CREATE INDEX jobs_created ON jobs(created_at);
    """,
    # 5: how far each download of a job got, so a retry after a crash resumes it
    # (disks/resume.py); finished_at indexed for pruning by age and count; the libvirt
    # domains a job defines, recorded before they exist, so a crash leaves none behind
    """
    CREATE TABLE download_checkpoints (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        temp TEXT NOT NULL,
        validator TEXT NOT NULL,
        "offset" INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        final INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX download_checkpoints_job ON download_checkpoints(job_id, target, "offset");
    CREATE INDEX jobs_finished ON jobs(finished_at);
    CREATE TABLE job_domains (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        uri TEXT NOT NULL,
        uuid TEXT NOT NULL,
        console_log TEXT NOT NULL
    );
    CREATE INDEX job_domains_job ON job_domains(job_id);
    """,
    # 6: several hypervisords on one database (service/fleet.py): which instance runs or
    # ran each job, a cancel asked on another instance, who recovered a job whose
    # instance stopped answering; each instance's lease, renewed by its heartbeat
    """
    ALTER TABLE jobs ADD COLUMN instance TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN cancel_requested TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN recovered_by TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_instance ON jobs(instance, status);
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        lease_until REAL NOT NULL
    );
    """,
    # 7: migration plans (service/plans.py): a plan's definition and state, the instance
    # that releases its VMs, and one row per VM once the plan starts (its job, how it
    # ended); job ids are not foreign keys, since a plan's report outlives the retention
    # of its jobs
    """
    CREATE TABLE plans (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('created', 'running', 'completed', 'failed',
                                               'cancelled')),
        created_by_uid INTEGER NOT NULL DEFAULT -1,
        requested_by TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        preflight TEXT NOT NULL DEFAULT '',
        report_path TEXT NOT NULL DEFAULT '',
        instance TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE plan_vms (
        plan_id TEXT NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        vm TEXT NOT NULL,
        name TEXT NOT NULL,
        host TEXT NOT NULL DEFAULT '',
        datastore TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('waiting', 'released', 'completed', 'failed',
                                             'cancelled')),
        job_id TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        started_at REAL,
        finished_at REAL,
        outcome TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (plan_id, vm)
    );
    CREATE INDEX plan_vms_job ON plan_vms(job_id);
    """,
    # 8: the storage volumes a job creates on a target (kvm/targets.py), recorded before
    # they exist, so a crash leaves none behind
    """
    CREATE TABLE job_volumes (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        uri TEXT NOT NULL,
        pool TEXT NOT NULL,
        name TEXT NOT NULL
    );
    CREATE INDEX job_volumes_job ON job_volumes(job_id);
    """,
]


def statements(script: str) -> list[str]:
    """The statements of a migration script."""
    return [statement for statement in script.split(";") if statement.strip()]


# the records of what a job made, removed with it by job_output.remove_leftovers
MADE_BY_JOBS = ("job_paths", "job_domains", "job_volumes")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
JOB_STATUSES = ("pending", "running") + TERMINAL_STATUSES


@dataclass
class JobRecord:
    id: str
    kind: str
    status: str
    definition: dict
    vm: str = ""
    provider: str = ""
    started_by_uid: int = -1
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    stage: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    attempts: int = 0
    error: str = ""
    result: dict = field(default_factory=dict)
    retry_of: str | None = None
    requested_by: str = ""  # "rest:<token name>" or "unix:<user>" (dbus/dispatch.py)
    instance: str = ""  # the hypervisord that runs or ran it (daemon.instance)
    cancel_requested: str = ""  # the instance a cancel was asked on, for the one running it
    recovered_by: str = ""  # the instance that ended it when its own stopped answering

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class LogLine:
    id: int
    time: float
    level: str
    message: str


def _past_retention(keep: int, finished_before: float) -> tuple[str, list]:
    """The WHERE clause of finished jobs beyond the newest `keep` (0: no count limit) or
    finished before `finished_before` (0: no age limit) that no backup points at."""
    conditions, params = [], []
    if keep:
        conditions.append("id NOT IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL"
                          " ORDER BY finished_at DESC LIMIT ?)")
        params.append(keep)
    if finished_before:
        conditions.append("finished_at < ?")
        params.append(finished_before)
    if not conditions:
        return "", []
    return (f"status IN ('completed', 'failed', 'cancelled') AND ({' OR '.join(conditions)})"
            " AND id NOT IN (SELECT job_id FROM backups WHERE state != 'deleted')"), params




def _row_to_job(row: Row) -> JobRecord:
    data = dict(zip(row.keys(), row))
    data["definition"] = json.loads(data["definition"])
    data["result"] = json.loads(data["result"])
    return JobRecord(**data)


async def _write_status(db: "Db", job: JobRecord, reason: str) -> None:
    """The job's status and the fields that change with it, plus a history row."""
    await _update_status(db, job, "id=?", (job.id,))
    await _history(db, job, reason)


async def _update_status(db: "Db", job: JobRecord, where: str, params: tuple) -> int:
    """UPDATE the job's status and the fields that change with it WHERE ...; the row count."""
    return (await db.execute(
        "UPDATE jobs SET status=?, started_at=?, finished_at=?, error=?, result=?,"
        f" attempts=?, stage=?, bytes_done=?, bytes_total=?, instance=?, recovered_by=?"
        f" WHERE {where}",
        (job.status, job.started_at, job.finished_at, job.error, json.dumps(job.result),
         job.attempts, job.stage, job.bytes_done, job.bytes_total, job.instance,
         job.recovered_by, *params))).rowcount


async def _history(db: "Db", job: JobRecord, reason: str) -> None:
    await db.execute("INSERT INTO job_status_history (job_id, time, status, reason)"
                     " VALUES (?,?,?,?)", (job.id, time.time(), job.status, reason))


def _job_filter(status: str | None, provider: str | None) -> tuple[str, list]:
    """A WHERE clause (or "") and its parameters for list_jobs and count_jobs."""
    conditions, params = [], []
    for column, value in (("status", status), ("provider", provider)):
        if value:
            conditions.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def pending_migrations(current: int, where: str) -> list[tuple[int, str]]:
    """(version, script) of the migrations a store at schema version `current` lacks."""
    if current > len(MIGRATIONS):
        raise Failed(f"{where}: schema version {current} is newer than this "
                     f"hypervisord understands ({len(MIGRATIONS)})")
    return list(enumerate(MIGRATIONS[current:], start=current + 1))


async def open_store(url: str, connect_timeout: float = 10.0,
                     statement_timeout: float = 30.0) -> "Store":
    """The store at a database.url: postgresql://... (or postgres://) or sqlite:///path;
    the timeouts (database.connect_timeout, database.statement_timeout) are PostgreSQL's."""
    if url.startswith(("postgresql://", "postgres://")):
        from .pgstore import PostgresStore, Timeouts  # psycopg and libpq only where asked for
        store = PostgresStore(url, Timeouts(connect_timeout, statement_timeout))
        await store.open()
        return store
    return Store(Path(url.removeprefix("sqlite://")))


class Row(Protocol):
    """A row, by position and by column name (sqlite3.Row, pgstore.Row)."""

    def __getitem__(self, key: Any) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def keys(self) -> list[str]: ...


class Result:
    """What one statement gave: its rows (read in full: the store's are few) and the
    number of rows it changed."""

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return self.rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


class Db(Protocol):
    """A store's connection, as Store.transaction hands it out: the store's SQL, `?`
    placeholders, awaited."""

    in_transaction: bool

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...
    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Result: ...


class SqliteDb:
    """The sqlite3 connection behind the async Db face: a local file, microseconds per
    call, so it runs on the event loop thread."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self.in_transaction = False

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        cursor = self.raw.execute(sql, params)
        return Result(cursor.fetchall(), cursor.rowcount)

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Result:
        cursor = self.raw.executemany(sql, params)
        return Result([], cursor.rowcount)


Taken = tuple["asyncio.Future[None] | None", "asyncio.Future[None]"]
_reserved: ContextVar[Taken | None] = ContextVar("store_turn_reserved", default=None)


class Turns:
    """One store call at a time on the store's one connection, in the order the calls
    were made (not the order their coroutines happen to resume): a statement never
    lands inside another coroutine's transaction, and a call made from code that cannot
    await (Store.soon: a job's log line) still comes before every call made after it."""

    def __init__(self) -> None:
        self._last: asyncio.Future[None] | None = None

    def take(self) -> Taken:
        """A place in the line: (the turn before it, or None; the end of this one)."""
        previous, self._last = self._last, asyncio.get_running_loop().create_future()
        return previous, self._last

    @asynccontextmanager
    async def turn(self, taken: Taken | None = None) -> AsyncIterator[None]:
        previous, mine = taken or self.take()
        try:
            if previous is not None and not previous.done():
                await asyncio.shield(previous)  # a cancelled caller leaves `previous` be
            yield
        finally:
            self.give_back((previous, mine))

    @staticmethod
    def give_back(taken: Taken) -> None:
        """End a turn (cancelled while waiting, or never taken: when it comes)."""
        previous, mine = taken
        if mine.done():
            return
        if previous is None or previous.done():
            mine.set_result(None)
        else:
            previous.add_done_callback(lambda _: mine.done() or mine.set_result(None))


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("store: %s failed: %s", task.get_name(), task.exception())


class Store:
    """The SQLite store (pgstore.PostgresStore: the same in PostgreSQL). Every call is
    awaited and takes its turn on the one connection (Turns)."""

    SKIP_LOCKED = ""  # PostgreSQL's row-lock clause; SQLite's one writer needs none
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # seconds since the epoch, in SQL
    BEGIN = "BEGIN IMMEDIATE"  # SQLite: take the write lock now, not at the first write
    SHARED = False  # instances on other hosts may share it (fleet.py: leases matter)
    # what its calls raise when the database fails (full disk, lost server): callers
    # catch `store.errors` and stay independent of the engine behind it
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        raw = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        raw.row_factory = sqlite3.Row
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA foreign_keys=ON")
        raw.execute("PRAGMA synchronous=NORMAL")
        raw.execute("PRAGMA busy_timeout=5000")
        self.path.chmod(0o600)
        self._migrate_sqlite(raw, str(self.path))
        self._db: Db = SqliteDb(raw)
        self._turns = Turns()

    @staticmethod
    def _migrate_sqlite(raw: sqlite3.Connection, where: str) -> None:
        """Apply the missing migrations, each in a transaction of its own (at open, before
        any call: no turns needed)."""
        for version, script in pending_migrations(
                raw.execute("PRAGMA user_version").fetchone()[0], where):
            raw.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(script):
                    raw.execute(statement)
                raw.execute(f"PRAGMA user_version = {version}")
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")

    # -- plumbing --------------------------------------------------------------------
    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[Db]:
        """The connection, for one call (its place in line taken by soon() if it was)."""
        taken = _reserved.get()
        if taken is not None:
            _reserved.set(None)
        async with self._turns.turn(taken):
            yield self._db

    def soon(self, call: Callable[..., Awaitable[T]], *args: Any) -> "asyncio.Task[T]":
        """`call(*args)`, a method of this store, in a task whose turn is taken now, for
        code that cannot await (a job's log line, its progress, what it makes): it runs
        before every store call made after this one. A failure is logged; await the task
        to see it."""
        taken = self._turns.take()
        context = contextvars.copy_context()
        context.run(_reserved.set, taken)
        task = asyncio.get_running_loop().create_task(call(*args), name=call.__name__,
                                                      context=context)
        task.add_done_callback(_log_failure)
        task.add_done_callback(lambda _: self._turns.give_back(taken))
        return task

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Db]:
        async with self._turn() as db:
            await db.execute(self.BEGIN)
            db.in_transaction = True
            try:
                yield db
            except BaseException:
                with suppress(*self.errors):  # a lost connection rolled back already
                    await db.execute("ROLLBACK")
                raise
            finally:
                db.in_transaction = False
            await db.execute("COMMIT")

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        async with self._turn() as db:
            return await db.execute(sql, params)

    async def schema_version(self) -> int:
        return (await self.execute("PRAGMA user_version")).rows[0][0]

    async def close(self) -> None:
        """Close the connection once the calls already made are done."""
        async with self._turn():
            self._db.raw.close()

    # -- jobs ------------------------------------------------------------------------
    async def insert_job(self, job: JobRecord) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO jobs (id, kind, status, definition, vm, provider, started_by_uid,"
                " created_at, retry_of, requested_by) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job.id, job.kind, job.status, json.dumps(job.definition), job.vm, job.provider,
                 job.started_by_uid, job.created_at, job.retry_of, job.requested_by))
            await db.execute("INSERT INTO job_status_history (job_id, time, status)"
                             " VALUES (?,?,?)", (job.id, job.created_at, job.status))

    async def get_job(self, job_id: str) -> JobRecord:
        row = (await self.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return _row_to_job(row)

    async def list_jobs(self, status: str | None = None, limit: int = 1000, offset: int = 0,
                        provider: str | None = None) -> list[JobRecord]:
        """Jobs oldest first, optionally of one status and provider."""
        where, params = _job_filter(status, provider)
        sql = f"SELECT * FROM jobs{where} ORDER BY created_at, rowid LIMIT ? OFFSET ?"
        return [_row_to_job(r) for r in await self.execute(sql, [*params, limit, offset])]

    async def count_jobs(self, status: str | None = None, provider: str | None = None) -> int:
        where, params = _job_filter(status, provider)
        return (await self.execute(f"SELECT COUNT(*) FROM jobs{where}", params)).rows[0][0]

    async def unfinished_jobs(self) -> list[JobRecord]:
        return [_row_to_job(r) for r in await self.execute(
            "SELECT * FROM jobs WHERE status IN ('pending', 'running') ORDER BY created_at, rowid")]

    async def jobs_unfinished_or_since(self, finished_since: float) -> list[JobRecord]:
        """The jobs not finished yet and those finished at or after `finished_since`."""
        return [_row_to_job(r) for r in await self.execute(
            "SELECT * FROM jobs WHERE status IN ('pending', 'running') OR finished_at >= ?"
            " ORDER BY created_at, rowid", (finished_since,))]

    async def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, count in await self.execute(
                "SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = count
        return counts

    async def prune_finished(self, keep: int, finished_before: float) -> list[JobRecord]:
        """Delete finished jobs beyond the newest `keep` (0: no count limit) or finished
        before `finished_before` (0: no age limit), with their logs and history. Jobs a
        backup record still points at, or with paths on disk recorded as theirs
        (job_paths: data kept for a resume), stay. Returns the deleted jobs."""
        where, params = _past_retention(keep, finished_before)
        if not where:
            return []
        where += " AND id NOT IN (SELECT job_id FROM job_paths)"
        async with self.transaction() as db:
            jobs = [_row_to_job(row) for row in
                    await db.execute(f"SELECT * FROM jobs WHERE {where}", params)]
            await db.executemany("DELETE FROM jobs WHERE id = ?", [(job.id,) for job in jobs])
        return jobs

    async def past_retention_holding_paths(self, keep: int, finished_before: float) -> list[str]:
        """The finished jobs prune_finished would delete but for their job_paths."""
        where, params = _past_retention(keep, finished_before)
        if not where:
            return []
        return [row[0] for row in await self.execute(
            f"SELECT id FROM jobs WHERE {where} AND id IN (SELECT job_id FROM job_paths)",
            params)]

    async def set_status(self, job: JobRecord, reason: str = "") -> None:
        """Persist the status and the fields that change with it, plus a history row."""
        async with self.transaction() as db:
            await _write_status(db, job, reason)

    async def claim_pending(self, limit: int = 1, instance: str = "",
                            skip_kinds: tuple[str, ...] = ()) -> list[JobRecord]:
        """Up to `limit` pending jobs, oldest first, none of `skip_kinds`, now running on
        `instance`: each is taken by one caller only, however many stores share the
        database (SQLite: the write lock BEGIN IMMEDIATE takes; PostgreSQL: row locks,
        skipping rows another holds)."""
        skipped = "".join(" AND kind != ?" for _ in skip_kinds)
        async with self.transaction() as db:
            rows = await db.execute(f"SELECT * FROM jobs WHERE status='pending'{skipped} ORDER"
                                    f" BY created_at, rowid LIMIT ?{self.SKIP_LOCKED}",
                                    (*skip_kinds, limit))
            jobs = [_row_to_job(row) for row in rows]
            for job in jobs:
                job.status, job.started_at, job.instance = "running", time.time(), instance
                await _write_status(db, job, "claimed")
        return jobs

    async def end_if(self, job: JobRecord, was: str, reason: str) -> bool:
        """Record the job's new status only if it still is `was` (and, for "running", on
        `job.instance`): whoever changes it first wins, however many instances try."""
        where, params = "id=? AND status=?", (job.id, was)
        if was == "running":
            where, params = where + " AND instance=?", params + (job.instance,)
        async with self.transaction() as db:
            if not await _update_status(db, job, where, params):
                return False
            await _history(db, job, reason)
        return True

    # -- instances sharing the database (fleet.py) -----------------------------------------
    async def database_time(self) -> float:
        """Now by the database's clock, the one every lease is measured with."""
        return float((await self.execute(f"SELECT {self.NOW}")).rows[0][0])

    async def renew_lease(self, instance: str, seconds: float, starting: bool = False) -> None:
        """The instance answers for `seconds` more (starting: its start is recorded)."""
        await self.execute(
            f"INSERT INTO instances (name, started_at, heartbeat_at, lease_until) VALUES"
            f" (?, {self.NOW}, {self.NOW}, {self.NOW} + ?) ON CONFLICT(name) DO UPDATE SET"
            " heartbeat_at=excluded.heartbeat_at, lease_until=excluded.lease_until"
            + (", started_at=excluded.started_at" if starting else ""), (instance, seconds))

    async def expired_instances(self, instance: str) -> list[tuple[str, float]]:
        """(name, last heartbeat) of the other instances whose lease has run out."""
        return [(row[0], row[1]) for row in await self.execute(
            f"SELECT name, heartbeat_at FROM instances WHERE lease_until < {self.NOW}"
            " AND name != ? ORDER BY name", (instance,))]

    async def newest_retry(self, job_id: str) -> JobRecord | None:
        """The latest job made by retrying `job_id` (RetryJob, export.resume_on_start or
        a recovery by another instance), if any."""
        row = (await self.execute("SELECT * FROM jobs WHERE retry_of=? ORDER BY created_at"
                                  " DESC LIMIT 1", (job_id,))).fetchone()
        return _row_to_job(row) if row else None

    async def running_on(self, instances: tuple[str, ...]) -> list[JobRecord]:
        marks = ",".join("?" * len(instances))
        return [_row_to_job(row) for row in await self.execute(
            f"SELECT * FROM jobs WHERE status='running' AND instance IN ({marks})"
            " ORDER BY created_at, rowid", instances)]

    async def recovered_from(self, instance: str, job_ids: set[str]) -> dict[str, str]:
        """{job id: the instance that recovered it} of those of `job_ids`, running on
        `instance`, that another instance recovered (it did not answer meanwhile)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        return {row[0]: row[1] for row in await self.execute(
            f"SELECT id, recovered_by FROM jobs WHERE id IN ({marks}) AND instance=?"
            " AND recovered_by NOT IN ('', ?)", (*job_ids, instance, instance))}

    async def request_cancel(self, job_id: str, instance: str) -> bool:
        """Ask the instance running the job to cancel it (it looks at its heartbeat)."""
        return bool((await self.execute(
            "UPDATE jobs SET cancel_requested=? WHERE id=? AND status='running'",
            (instance, job_id))).rowcount)

    async def cancels_requested(self, instance: str) -> dict[str, str]:
        """{job id: the instance the cancel was asked on} of the instance's running jobs."""
        return {row[0]: row[1] for row in await self.execute(
            "SELECT id, cancel_requested FROM jobs WHERE instance=? AND status='running'"
            " AND cancel_requested != ''", (instance,))}

    async def recovered_elsewhere(self, instance: str) -> list[str]:
        """The jobs of `instance` another one recovered that still hold what they made
        here (files, domains, volumes): this instance removes them."""
        holds = " OR ".join(f"id IN (SELECT job_id FROM {table})" for table in MADE_BY_JOBS)
        return [row[0] for row in await self.execute(
            f"SELECT id FROM jobs WHERE instance=? AND recovered_by NOT IN ('', ?) AND ({holds})",
            (instance, instance))]

    async def save_progress(self, job: JobRecord) -> None:
        """The progress of a job running on `job.instance` (not once another instance
        recovered it)."""
        await self.execute("UPDATE jobs SET stage=?, bytes_done=?, bytes_total=? WHERE id=?"
                           " AND status='running' AND instance=?",
                           (job.stage, job.bytes_done, job.bytes_total, job.id, job.instance))

    async def status_history(self, job_id: str) -> list[tuple[float, str, str]]:
        return [tuple(r) for r in await self.execute(
            "SELECT time, status, reason FROM job_status_history WHERE job_id=? ORDER BY id",
            (job_id,))]

    async def append_log(self, job_id: str, when: float, level: str, message: str) -> int:
        rows = (await self.execute(
            "INSERT INTO job_logs (job_id, time, level, message) VALUES (?,?,?,?) RETURNING id",
            (job_id, when, level, message))).rows
        return int(rows[0][0])

    async def logs(self, job_id: str, after_id: int = 0, limit: int = 10000) -> list[LogLine]:
        return [LogLine(*r) for r in await self.execute(
            "SELECT id, time, level, message FROM job_logs WHERE job_id=? AND id>?"
            " ORDER BY id LIMIT ?", (job_id, after_id, limit))]

    # -- what jobs made on disk (staging.py) ---------------------------------------------
    async def record_owned(self, job_id: str, owned: OwnedPath) -> None:
        await self.execute(
            "INSERT INTO job_paths (job_id, kind, root, relative, dev, ino) VALUES (?,?,?,?,?,?)",
            (job_id, owned.kind, owned.root, owned.relative, owned.dev, owned.ino))

    async def forget_owned(self, job_id: str, owned: OwnedPath) -> None:
        await self.execute(
            "DELETE FROM job_paths WHERE job_id=? AND kind=? AND root=? AND relative=?"
            " AND dev=? AND ino=?",
            (job_id, owned.kind, owned.root, owned.relative, owned.dev, owned.ino))

    async def hand_over(self, from_job: str, to_job: str) -> None:
        """What `from_job` kept for a resume (its paths and checkpoints) becomes `to_job`'s."""
        async with self.transaction() as db:
            for table in ("job_paths", "download_checkpoints"):
                await db.execute(f"UPDATE {table} SET job_id=? WHERE job_id=?",
                                 (to_job, from_job))

    # -- libvirt domains a job defined (job_output.py) ---------------------------------------
    async def record_domain(self, job_id: str, uri: str, uuid: str, console_log: str) -> None:
        await self.execute("INSERT INTO job_domains (job_id, uri, uuid, console_log)"
                           " VALUES (?,?,?,?)", (job_id, uri, uuid, console_log))

    async def owned_domains(self, job_id: str) -> list[tuple[str, str, str]]:
        """(uri, uuid, console log or "") of the domains the job defined and has not kept
        or removed."""
        return [(row[0], row[1], row[2]) for row in await self.execute(
            "SELECT uri, uuid, console_log FROM job_domains WHERE job_id=? ORDER BY id",
            (job_id,))]

    async def forget_domain(self, job_id: str, uri: str, uuid: str) -> None:
        await self.execute("DELETE FROM job_domains WHERE job_id=? AND uri=? AND uuid=?",
                           (job_id, uri, uuid))

    async def forget_domains(self, job_id: str) -> None:
        await self.execute("DELETE FROM job_domains WHERE job_id=?", (job_id,))

    # -- storage volumes a job created on a target (job_output.py) ----------------------
    async def record_volume(self, job_id: str, uri: str, pool: str, name: str) -> None:
        await self.execute("INSERT INTO job_volumes (job_id, uri, pool, name)"
                           " VALUES (?,?,?,?)", (job_id, uri, pool, name))

    async def owned_volumes(self, job_id: str) -> list[tuple[str, str, str]]:
        """(uri, pool, name) of the volumes the job created and has not kept or removed."""
        return [(row[0], row[1], row[2]) for row in await self.execute(
            "SELECT uri, pool, name FROM job_volumes WHERE job_id=? ORDER BY id", (job_id,))]

    async def forget_volume(self, job_id: str, uri: str, pool: str, name: str) -> None:
        await self.execute("DELETE FROM job_volumes WHERE job_id=? AND uri=? AND pool=?"
                           " AND name=?", (job_id, uri, pool, name))

    async def forget_volumes(self, job_id: str) -> None:
        await self.execute("DELETE FROM job_volumes WHERE job_id=?", (job_id,))

    # -- download checkpoints (disks/resume.py) --------------------------------------------
    async def save_checkpoint(self, job_id: str, target: str, temp: str, validator: str,
                              point: Checkpoint) -> None:
        await self.execute(
            "INSERT INTO download_checkpoints (job_id, target, temp, validator, \"offset\", sha256,"
            " final) VALUES (?,?,?,?,?,?,?)", (job_id, target, temp, validator, point.offset,
                                               point.sha256, int(point.final)))

    async def saved_downloads(self, job_id: str) -> dict[str, SavedDownload]:
        """{target: what the job's checkpoints say of its download} of every download."""
        rows = await self.execute(
            'SELECT target, temp, validator, "offset", sha256, final FROM download_checkpoints'
            ' WHERE job_id=? ORDER BY target, "offset", id', (job_id,))
        by_target: dict[str, list[Row]] = {}
        for row in rows:
            by_target.setdefault(row["target"], []).append(row)
        return {target: SavedDownload(last["temp"], last["validator"],
                                      [Checkpoint(row["offset"], row["sha256"], bool(row["final"]))
                                       for row in points])
                for target, points in by_target.items() for last in (points[-1],)}

    async def clear_checkpoints(self, job_id: str, target: str | None = None) -> None:
        """Forget the job's checkpoints of `target` (None: of every download)."""
        if target is None:
            await self.execute("DELETE FROM download_checkpoints WHERE job_id=?", (job_id,))
        else:
            await self.execute("DELETE FROM download_checkpoints WHERE job_id=? AND target=?",
                               (job_id, target))

    async def jobs_keeping_downloads(self) -> list[JobRecord]:
        """The interrupted jobs that keep downloads for a resume, oldest first."""
        return [_row_to_job(row) for row in await self.execute(
            "SELECT * FROM jobs WHERE status='failed' AND id IN"
            " (SELECT job_id FROM download_checkpoints) ORDER BY created_at")]

    async def checkpoint_names(self, job_id: str) -> set[str]:
        """The files the job's checkpoints are about (final and temporary names)."""
        return {name for row in await self.execute(
            "SELECT DISTINCT target, temp FROM download_checkpoints WHERE job_id=?", (job_id,))
                for name in row}

    async def resumable_bytes(self, job_id: str) -> int:
        """Bytes of the job's downloads verified by checkpoints (0: nothing to resume)."""
        row = (await self.execute(
            'SELECT SUM(best) FROM (SELECT MAX("offset") AS best FROM download_checkpoints'
            ' WHERE job_id=? GROUP BY target) AS per_target', (job_id,))).fetchone()
        return int(row[0] or 0)

    async def owned_paths(self, job_id: str) -> list[OwnedPath]:
        """What the job made and has not yet kept or removed, in the order it was made."""
        return [OwnedPath(*row) for row in await self.execute(
            "SELECT kind, root, relative, dev, ino FROM job_paths WHERE job_id=? ORDER BY id",
            (job_id,))]
