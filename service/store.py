"""The SQLite store: the one source of truth for jobs and automation.

WAL mode, foreign keys on, `PRAGMA user_version` as the schema version, and an ordered
list of migrations applied in one transaction each at open. Calls are synchronous and
short (a row or two); they run on the event loop thread, which keeps ordering simple.
Progress is written at most once a second per job by the engine, not per chunk.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import Failed, NotFound
from .model import Checkpoint, SavedDownload
from .staging import OwnedPath

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


def _row_to_job(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    data["definition"] = json.loads(data["definition"])
    data["result"] = json.loads(data["result"])
    return JobRecord(**data)


def _write_status(db: sqlite3.Connection, job: JobRecord, reason: str) -> None:
    """The job's status and the fields that change with it, plus a history row."""
    _update_status(db, job, "id=?", (job.id,))
    _history(db, job, reason)


def _update_status(db: sqlite3.Connection, job: JobRecord, where: str,
                   params: tuple) -> int:
    """UPDATE the job's status and the fields that change with it WHERE ...; the row count."""
    return db.execute(
        "UPDATE jobs SET status=?, started_at=?, finished_at=?, error=?, result=?,"
        f" attempts=?, stage=?, bytes_done=?, bytes_total=?, instance=?, recovered_by=?"
        f" WHERE {where}",
        (job.status, job.started_at, job.finished_at, job.error, json.dumps(job.result),
         job.attempts, job.stage, job.bytes_done, job.bytes_total, job.instance,
         job.recovered_by, *params)).rowcount


def _history(db: sqlite3.Connection, job: JobRecord, reason: str) -> None:
    db.execute("INSERT INTO job_status_history (job_id, time, status, reason)"
               " VALUES (?,?,?,?)", (job.id, time.time(), job.status, reason))


def _job_filter(status: str | None, provider: str | None) -> tuple[str, list]:
    """A WHERE clause (or "") and its parameters for list_jobs and count_jobs."""
    conditions, params = [], []
    for column, value in (("status", status), ("provider", provider)):
        if value:
            conditions.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def open_store(url: str, connect_timeout: float = 10.0,
               statement_timeout: float = 30.0) -> "Store":
    """The store at a database.url: postgresql://... (or postgres://) or sqlite:///path;
    the timeouts (database.connect_timeout, database.statement_timeout) are PostgreSQL's."""
    if url.startswith(("postgresql://", "postgres://")):
        from .pgstore import PostgresStore, Timeouts  # psycopg and libpq only where asked for
        return PostgresStore(url, Timeouts(connect_timeout, statement_timeout))
    return Store(Path(url.removeprefix("sqlite://")))


class Store:
    """The SQLite store (pgstore.PostgresStore: the same in PostgreSQL)."""

    SKIP_LOCKED = ""  # PostgreSQL's row-lock clause; SQLite's one writer needs none
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # seconds since the epoch, in SQL
    # what its calls raise when the database fails (full disk, lost server): callers
    # catch `store.errors` and stay independent of the engine behind it
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self.path.chmod(0o600)
        self._migrate()

    # -- plumbing --------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        for version, script in self._pending_migrations():
            with self.transaction() as db:
                for statement in statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")

    def _pending_migrations(self) -> list[tuple[int, str]]:
        """(version, script) of the migrations this store has not applied yet."""
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise Failed(f"{self.path}: schema version {current} is newer than this "
                         f"hypervisord understands ({len(MIGRATIONS)})")
        return list(enumerate(MIGRATIONS[current:], start=current + 1))

    def close(self) -> None:
        self._db.close()

    # -- jobs ------------------------------------------------------------------------
    def insert_job(self, job: JobRecord) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, status, definition, vm, provider, started_by_uid,"
                " created_at, retry_of, requested_by) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job.id, job.kind, job.status, json.dumps(job.definition), job.vm, job.provider,
                 job.started_by_uid, job.created_at, job.retry_of, job.requested_by))
            db.execute("INSERT INTO job_status_history (job_id, time, status) VALUES (?,?,?)",
                       (job.id, job.created_at, job.status))

    def get_job(self, job_id: str) -> JobRecord:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return _row_to_job(row)

    def list_jobs(self, status: str | None = None, limit: int = 1000, offset: int = 0,
                  provider: str | None = None) -> list[JobRecord]:
        """Jobs oldest first, optionally of one status and provider."""
        where, params = _job_filter(status, provider)
        sql = f"SELECT * FROM jobs{where} ORDER BY created_at, rowid LIMIT ? OFFSET ?"
        return [_row_to_job(r) for r in self._db.execute(sql, [*params, limit, offset])]

    def count_jobs(self, status: str | None = None, provider: str | None = None) -> int:
        where, params = _job_filter(status, provider)
        return self._db.execute(f"SELECT COUNT(*) FROM jobs{where}", params).fetchone()[0]

    def unfinished_jobs(self) -> list[JobRecord]:
        return [_row_to_job(r) for r in self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('pending', 'running') ORDER BY created_at, rowid")]

    def jobs_unfinished_or_since(self, finished_since: float) -> list[JobRecord]:
        """The jobs not finished yet and those finished at or after `finished_since`."""
        return [_row_to_job(r) for r in self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('pending', 'running') OR finished_at >= ?"
            " ORDER BY created_at, rowid", (finished_since,))]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = count
        return counts

    def prune_finished(self, keep: int, finished_before: float) -> list[JobRecord]:
        """Delete finished jobs beyond the newest `keep` (0: no count limit) or finished
        before `finished_before` (0: no age limit), with their logs and history. Jobs a
        backup record still points at, or with paths on disk recorded as theirs
        (job_paths: data kept for a resume), stay. Returns the deleted jobs."""
        where, params = _past_retention(keep, finished_before)
        if not where:
            return []
        where += " AND id NOT IN (SELECT job_id FROM job_paths)"
        with self.transaction() as db:
            jobs = [_row_to_job(row) for row in
                    db.execute(f"SELECT * FROM jobs WHERE {where}", params)]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job.id,) for job in jobs])
        return jobs

    def past_retention_holding_paths(self, keep: int, finished_before: float) -> list[str]:
        """The finished jobs prune_finished would delete but for their job_paths."""
        where, params = _past_retention(keep, finished_before)
        if not where:
            return []
        return [row[0] for row in self._db.execute(
            f"SELECT id FROM jobs WHERE {where} AND id IN (SELECT job_id FROM job_paths)",
            params)]

    def set_status(self, job: JobRecord, reason: str = "") -> None:
        """Persist the status and the fields that change with it, plus a history row."""
        with self.transaction() as db:
            _write_status(db, job, reason)

    def claim_pending(self, limit: int = 1, instance: str = "",
                      skip_kinds: tuple[str, ...] = ()) -> list[JobRecord]:
        """Up to `limit` pending jobs, oldest first, none of `skip_kinds`, now running on
        `instance`: each is taken by one caller only, however many stores share the
        database (SQLite: the write lock BEGIN IMMEDIATE takes; PostgreSQL: row locks,
        skipping rows another holds)."""
        skipped = "".join(" AND kind != ?" for _ in skip_kinds)
        with self.transaction() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status='pending'{skipped} ORDER BY"
                              f" created_at, rowid LIMIT ?{self.SKIP_LOCKED}",
                              (*skip_kinds, limit)).fetchall()
            jobs = [_row_to_job(row) for row in rows]
            for job in jobs:
                job.status, job.started_at, job.instance = "running", time.time(), instance
                _write_status(db, job, "claimed")
        return jobs

    def end_if(self, job: JobRecord, was: str, reason: str) -> bool:
        """Record the job's new status only if it still is `was` (and, for "running", on
        `job.instance`): whoever changes it first wins, however many instances try."""
        where, params = "id=? AND status=?", (job.id, was)
        if was == "running":
            where, params = where + " AND instance=?", params + (job.instance,)
        with self.transaction() as db:
            if not _update_status(db, job, where, params):
                return False
            _history(db, job, reason)
        return True

    # -- instances sharing the database (fleet.py) -----------------------------------------
    def database_time(self) -> float:
        """Now by the database's clock, the one every lease is measured with."""
        return float(self._db.execute(f"SELECT {self.NOW}").fetchone()[0])

    def renew_lease(self, instance: str, seconds: float, starting: bool = False) -> None:
        """The instance answers for `seconds` more (starting: its start is recorded)."""
        self._db.execute(
            f"INSERT INTO instances (name, started_at, heartbeat_at, lease_until) VALUES"
            f" (?, {self.NOW}, {self.NOW}, {self.NOW} + ?) ON CONFLICT(name) DO UPDATE SET"
            " heartbeat_at=excluded.heartbeat_at, lease_until=excluded.lease_until"
            + (", started_at=excluded.started_at" if starting else ""), (instance, seconds))

    def expired_instances(self, instance: str) -> list[tuple[str, float]]:
        """(name, last heartbeat) of the other instances whose lease has run out."""
        return [(row[0], row[1]) for row in self._db.execute(
            f"SELECT name, heartbeat_at FROM instances WHERE lease_until < {self.NOW}"
            " AND name != ? ORDER BY name", (instance,))]

    def newest_retry(self, job_id: str) -> JobRecord | None:
        """The latest job made by retrying `job_id` (RetryJob, export.resume_on_start or
        a recovery by another instance), if any."""
        row = self._db.execute("SELECT * FROM jobs WHERE retry_of=? ORDER BY created_at DESC"
                               " LIMIT 1", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def running_on(self, instances: tuple[str, ...]) -> list[JobRecord]:
        marks = ",".join("?" * len(instances))
        return [_row_to_job(row) for row in self._db.execute(
            f"SELECT * FROM jobs WHERE status='running' AND instance IN ({marks})"
            " ORDER BY created_at, rowid", instances)]

    def recovered_from(self, instance: str, job_ids: set[str]) -> dict[str, str]:
        """{job id: the instance that recovered it} of those of `job_ids`, running on
        `instance`, that another instance recovered (it did not answer meanwhile)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        return {row[0]: row[1] for row in self._db.execute(
            f"SELECT id, recovered_by FROM jobs WHERE id IN ({marks}) AND instance=?"
            " AND recovered_by NOT IN ('', ?)", (*job_ids, instance, instance))}

    def request_cancel(self, job_id: str, instance: str) -> bool:
        """Ask the instance running the job to cancel it (it looks at its heartbeat)."""
        return bool(self._db.execute(
            "UPDATE jobs SET cancel_requested=? WHERE id=? AND status='running'",
            (instance, job_id)).rowcount)

    def cancels_requested(self, instance: str) -> dict[str, str]:
        """{job id: the instance the cancel was asked on} of the instance's running jobs."""
        return {row[0]: row[1] for row in self._db.execute(
            "SELECT id, cancel_requested FROM jobs WHERE instance=? AND status='running'"
            " AND cancel_requested != ''", (instance,))}

    def recovered_elsewhere(self, instance: str) -> list[str]:
        """The jobs of `instance` another one recovered that still hold what they made
        here (files, domains, volumes): this instance removes them."""
        holds = " OR ".join(f"id IN (SELECT job_id FROM {table})" for table in MADE_BY_JOBS)
        return [row[0] for row in self._db.execute(
            f"SELECT id FROM jobs WHERE instance=? AND recovered_by NOT IN ('', ?) AND ({holds})",
            (instance, instance))]

    def save_progress(self, job: JobRecord) -> None:
        """The progress of a job running on `job.instance` (not once another instance
        recovered it)."""
        self._db.execute("UPDATE jobs SET stage=?, bytes_done=?, bytes_total=? WHERE id=?"
                         " AND status='running' AND instance=?",
                         (job.stage, job.bytes_done, job.bytes_total, job.id, job.instance))

    def status_history(self, job_id: str) -> list[tuple[float, str, str]]:
        return [tuple(r) for r in self._db.execute(
            "SELECT time, status, reason FROM job_status_history WHERE job_id=? ORDER BY id",
            (job_id,))]

    def append_log(self, job_id: str, when: float, level: str, message: str) -> int:
        rows = self._db.execute(
            "INSERT INTO job_logs (job_id, time, level, message) VALUES (?,?,?,?) RETURNING id",
            (job_id, when, level, message)).fetchall()
        return int(rows[0][0])

    def logs(self, job_id: str, after_id: int = 0, limit: int = 10000) -> list[LogLine]:
        return [LogLine(*r) for r in self._db.execute(
            "SELECT id, time, level, message FROM job_logs WHERE job_id=? AND id>?"
            " ORDER BY id LIMIT ?", (job_id, after_id, limit))]

    # -- what jobs made on disk (staging.py) ---------------------------------------------
    def record_owned(self, job_id: str, owned: OwnedPath) -> None:
        self._db.execute(
            "INSERT INTO job_paths (job_id, kind, root, relative, dev, ino) VALUES (?,?,?,?,?,?)",
            (job_id, owned.kind, owned.root, owned.relative, owned.dev, owned.ino))

    def forget_owned(self, job_id: str, owned: OwnedPath) -> None:
        self._db.execute(
            "DELETE FROM job_paths WHERE job_id=? AND kind=? AND root=? AND relative=?"
            " AND dev=? AND ino=?",
            (job_id, owned.kind, owned.root, owned.relative, owned.dev, owned.ino))

    def hand_over(self, from_job: str, to_job: str) -> None:
        """What `from_job` kept for a resume (its paths and checkpoints) becomes `to_job`'s."""
        with self.transaction() as db:
            for table in ("job_paths", "download_checkpoints"):
                db.execute(f"UPDATE {table} SET job_id=? WHERE job_id=?", (to_job, from_job))

    # -- libvirt domains a job defined (job_output.py) ---------------------------------------
    def record_domain(self, job_id: str, uri: str, uuid: str, console_log: str) -> None:
        self._db.execute("INSERT INTO job_domains (job_id, uri, uuid, console_log)"
                         " VALUES (?,?,?,?)", (job_id, uri, uuid, console_log))

    def owned_domains(self, job_id: str) -> list[tuple[str, str, str]]:
        """(uri, uuid, console log or "") of the domains the job defined and has not kept
        or removed."""
        return [(row[0], row[1], row[2]) for row in self._db.execute(
            "SELECT uri, uuid, console_log FROM job_domains WHERE job_id=? ORDER BY id",
            (job_id,))]

    def forget_domains(self, job_id: str) -> None:
        self._db.execute("DELETE FROM job_domains WHERE job_id=?", (job_id,))

    # -- storage volumes a job created on a target (job_output.py) ----------------------
    def record_volume(self, job_id: str, uri: str, pool: str, name: str) -> None:
        self._db.execute("INSERT INTO job_volumes (job_id, uri, pool, name) VALUES (?,?,?,?)",
                         (job_id, uri, pool, name))

    def owned_volumes(self, job_id: str) -> list[tuple[str, str, str]]:
        """(uri, pool, name) of the volumes the job created and has not kept or removed."""
        return [(row[0], row[1], row[2]) for row in self._db.execute(
            "SELECT uri, pool, name FROM job_volumes WHERE job_id=? ORDER BY id", (job_id,))]

    def forget_volume(self, job_id: str, uri: str, pool: str, name: str) -> None:
        self._db.execute("DELETE FROM job_volumes WHERE job_id=? AND uri=? AND pool=?"
                         " AND name=?", (job_id, uri, pool, name))

    def forget_volumes(self, job_id: str) -> None:
        self._db.execute("DELETE FROM job_volumes WHERE job_id=?", (job_id,))

    # -- download checkpoints (disks/resume.py) --------------------------------------------
    def save_checkpoint(self, job_id: str, target: str, temp: str, validator: str,
                        point: Checkpoint) -> None:
        self._db.execute(
            "INSERT INTO download_checkpoints (job_id, target, temp, validator, \"offset\", sha256,"
            " final) VALUES (?,?,?,?,?,?,?)", (job_id, target, temp, validator, point.offset,
                                               point.sha256, int(point.final)))

    def saved_download(self, job_id: str, target: str) -> SavedDownload | None:
        rows = self._db.execute(
            'SELECT temp, validator, "offset", sha256, final FROM download_checkpoints'
            ' WHERE job_id=? AND target=? ORDER BY "offset", id', (job_id, target)).fetchall()
        if not rows:
            return None
        return SavedDownload(rows[-1]["temp"], rows[-1]["validator"],
                             [Checkpoint(row["offset"], row["sha256"], bool(row["final"]))
                              for row in rows])

    def clear_checkpoints(self, job_id: str, target: str | None = None) -> None:
        """Forget the job's checkpoints of `target` (None: of every download)."""
        if target is None:
            self._db.execute("DELETE FROM download_checkpoints WHERE job_id=?", (job_id,))
        else:
            self._db.execute("DELETE FROM download_checkpoints WHERE job_id=? AND target=?",
                             (job_id, target))

    def jobs_keeping_downloads(self) -> list[JobRecord]:
        """The interrupted jobs that keep downloads for a resume, oldest first."""
        return [_row_to_job(row) for row in self._db.execute(
            "SELECT * FROM jobs WHERE status='failed' AND id IN"
            " (SELECT job_id FROM download_checkpoints) ORDER BY created_at")]

    def checkpoint_names(self, job_id: str) -> set[str]:
        """The files the job's checkpoints are about (final and temporary names)."""
        return {name for row in self._db.execute(
            "SELECT DISTINCT target, temp FROM download_checkpoints WHERE job_id=?", (job_id,))
            for name in row}

    def resumable_bytes(self, job_id: str) -> int:
        """Bytes of the job's downloads verified by checkpoints (0: nothing to resume)."""
        row = self._db.execute(
            'SELECT SUM(best) FROM (SELECT MAX("offset") AS best FROM download_checkpoints'
            ' WHERE job_id=? GROUP BY target) AS per_target', (job_id,)).fetchone()
        return int(row[0] or 0)

    def owned_paths(self, job_id: str) -> list[OwnedPath]:
        """What the job made and has not yet kept or removed, in the order it was made."""
        return [OwnedPath(*row) for row in self._db.execute(
            "SELECT kind, root, relative, dev, ino FROM job_paths WHERE job_id=? ORDER BY id",
            (job_id,))]
