"""The store on real files and a real PostgreSQL server: migrations, WAL, tight modes,
transactions. Tests taking `database_url` run once on each engine."""
from __future__ import annotations

import sqlite3
import time

import psycopg
import pytest

from hypersdk.service import store as store_module
from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.store import JobRecord, Store, open_store


def _job(job_id: str = "job-1") -> JobRecord:
    return JobRecord(id=job_id, kind="sleep", status="pending", definition={"a": 1},
                     created_at=time.time())


def test_a_new_store_is_migrated_to_the_latest_version_with_wal_and_a_tight_mode(tmp_path):
    store = Store(tmp_path / "state" / "db.sqlite")
    assert store.schema_version == len(store_module.MIGRATIONS)
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert (tmp_path / "state" / "db.sqlite").stat().st_mode & 0o777 == 0o600
    store.close()


def test_an_old_store_gets_only_the_missing_migrations(database_url, monkeypatch):
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    old = open_store(database_url)
    old.execute("INSERT INTO jobs (id, kind, status, definition, created_at)"
                " VALUES ('job-1', 'sleep', 'pending', '{\"a\": 1}', 0)")
    old.close()
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        store_module.MIGRATIONS + ["CREATE TABLE extra (x INTEGER)"])
    new = open_store(database_url)
    assert new.schema_version == len(store_module.MIGRATIONS)
    assert new.get_job("job-1").definition == {"a": 1}
    new.execute("INSERT INTO extra VALUES (1)")
    new.close()


def test_a_store_from_a_newer_version_is_refused(database_url):
    store = open_store(database_url)
    store.execute("PRAGMA user_version = 999" if database_url.startswith("sqlite:")
                  else "UPDATE schema_version SET version = 999")
    store.close()
    with pytest.raises(Failed, match="schema version 999 is newer"):
        open_store(database_url)


def test_a_failed_transaction_writes_nothing(database_url):
    store = open_store(database_url)
    store.insert_job(_job())
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.insert_job(_job())  # same id: the history row must not land either
    assert len(store.status_history("job-1")) == 1
    with pytest.raises(NotFound):
        store.get_job("job-2")
    store.close()


def test_jobs_logs_and_history_round_trip(database_url):
    store = open_store(database_url)
    job = _job()
    store.insert_job(job)
    job.status, job.result = "completed", {"ok": True}
    store.set_status(job, reason="done")
    first = store.append_log("job-1", 1.0, "info", "one")
    store.append_log("job-1", 2.0, "error", "two")
    assert [line.message for line in store.logs("job-1", after_id=first)] == ["two"]
    assert [h[1] for h in store.status_history("job-1")] == ["pending", "completed"]
    assert store.list_jobs(status="completed")[0].result == {"ok": True}
    store.close()
