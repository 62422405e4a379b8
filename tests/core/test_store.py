"""The SQLite store on real files: migrations, WAL, tight modes, transactions."""
from __future__ import annotations

import sqlite3
import time

import pytest

from hypersdk.service import store as store_module
from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.store import JobRecord, Store


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


def test_an_old_store_gets_only_the_missing_migrations(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    old = Store(path)
    old.execute("INSERT INTO jobs (id, kind, status, definition, created_at)"
                " VALUES ('job-1', 'sleep', 'pending', '{\"a\": 1}', 0)")
    old.close()
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        store_module.MIGRATIONS + ["CREATE TABLE extra (x INTEGER)"])
    new = Store(path)
    assert new.schema_version == len(store_module.MIGRATIONS)
    assert new.get_job("job-1").definition == {"a": 1}
    new.execute("INSERT INTO extra VALUES (1)")
    new.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 999")
    with pytest.raises(Failed, match="schema version 999 is newer"):
        Store(path)


def test_a_failed_transaction_writes_nothing(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.insert_job(_job())
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_job(_job())  # same id: the history row must not land either
    assert len(store.status_history("job-1")) == 1
    with pytest.raises(NotFound):
        store.get_job("job-2")


def test_jobs_logs_and_history_round_trip(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    job = _job()
    store.insert_job(job)
    job.status, job.result = "completed", {"ok": True}
    store.set_status(job, reason="done")
    first = store.append_log("job-1", 1.0, "info", "one")
    store.append_log("job-1", 2.0, "error", "two")
    assert [line.message for line in store.logs("job-1", after_id=first)] == ["two"]
    assert [h[1] for h in store.status_history("job-1")] == ["pending", "completed"]
    assert store.list_jobs(status="completed")[0].result == {"ok": True}

