"""The store on real files and a real PostgreSQL server: migrations, WAL, tight modes,
transactions. Tests taking `database_url` run once on each engine."""
from __future__ import annotations

import asyncio
import sqlite3
import time

import psycopg
import pytest

from hypersdk.service import store as store_module
from hypersdk.service.errors import Failed, NotFound
from hypersdk.service.model import Checkpoint, SavedDownload
from hypersdk.service.staging import OwnedPath
from hypersdk.service.store import JobRecord, Store, open_store


def _job(job_id: str = "job-1") -> JobRecord:
    return JobRecord(id=job_id, kind="sleep", status="pending", definition={"a": 1},
                     created_at=time.time())


async def test_a_new_store_is_migrated_to_the_latest_version_with_wal_and_a_tight_mode(tmp_path):
    store = Store(tmp_path / "state" / "db.sqlite")
    assert await store.schema_version() == len(store_module.MIGRATIONS)
    assert (await store.execute("PRAGMA journal_mode")).fetchone()[0] == "wal"
    assert (await store.execute("PRAGMA foreign_keys")).fetchone()[0] == 1
    assert (tmp_path / "state" / "db.sqlite").stat().st_mode & 0o777 == 0o600
    await store.close()


async def test_an_old_store_gets_only_the_missing_migrations(database_url, monkeypatch):
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    old = await open_store(database_url)
    await old.execute("INSERT INTO jobs (id, kind, status, definition, created_at)"
                      " VALUES ('job-1', 'sleep', 'pending', '{\"a\": 1}', 0)")
    await old.close()
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        store_module.MIGRATIONS + ["CREATE TABLE extra (x INTEGER)"])
    new = await open_store(database_url)
    assert await new.schema_version() == len(store_module.MIGRATIONS)
    assert (await new.get_job("job-1")).definition == {"a": 1}
    await new.execute("INSERT INTO extra VALUES (1)")
    await new.close()


async def test_a_store_from_a_newer_version_is_refused(database_url):
    store = await open_store(database_url)
    await store.execute("PRAGMA user_version = 999" if database_url.startswith("sqlite:")
                        else "UPDATE schema_version SET version = 999")
    await store.close()
    with pytest.raises(Failed, match="schema version 999 is newer"):
        await open_store(database_url)


async def test_a_failed_transaction_writes_nothing(database_url):
    store = await open_store(database_url)
    await store.insert_job(_job())
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        await store.insert_job(_job())  # same id: the history row must not land either
    assert len(await store.status_history("job-1")) == 1
    with pytest.raises(NotFound):
        await store.get_job("job-2")
    await store.close()


async def test_jobs_logs_and_history_round_trip(database_url):
    store = await open_store(database_url)
    job = _job()
    await store.insert_job(job)
    job.status, job.result = "completed", {"ok": True}
    await store.set_status(job, reason="done")
    first = await store.append_log("job-1", 1.0, "info", "one")
    await store.append_log("job-1", 2.0, "error", "two")
    assert [line.message for line in await store.logs("job-1", after_id=first)] == ["two"]
    assert [h[1] for h in await store.status_history("job-1")] == ["pending", "completed"]
    assert (await store.list_jobs(status="completed"))[0].result == {"ok": True}
    await store.close()


async def test_listing_counting_and_pruning_jobs(database_url):
    store = await open_store(database_url)
    for number in range(1, 6):  # one timestamp: insertion order breaks the tie
        await store.insert_job(JobRecord(id=f"job-{number}", kind="sleep", status="pending",
                                         definition={}, provider="p1" if number < 3 else "p2",
                                         created_at=1000.0))
    assert [job.id for job in await store.list_jobs(limit=2, offset=1)] == ["job-2", "job-3"]
    assert await store.count_jobs(provider="p2") == 3
    for number, finished_at in ((1, 10.0), (2, 20.0), (3, 30.0)):
        job = await store.get_job(f"job-{number}")
        job.status, job.finished_at, job.bytes_total = "completed", finished_at, 5 << 40
        await store.set_status(job)
    assert await store.count_by_status() == {"pending": 2, "running": 0, "completed": 3,
                                             "failed": 0, "cancelled": 0}
    assert [job.id for job in await store.jobs_unfinished_or_since(20.0)] == [
        "job-2", "job-3", "job-4", "job-5"]
    assert (await store.get_job("job-3")).bytes_total == 5 << 40  # past 32 bits
    await store.record_owned("job-2", OwnedPath("file", "/srv", "kept.img", 1, 2))
    assert await store.past_retention_holding_paths(keep=1, finished_before=0) == ["job-2"]
    assert [job.id for job in await store.prune_finished(keep=1, finished_before=0)] == ["job-1"]
    assert [job.id for job in await store.list_jobs()] == ["job-2", "job-3", "job-4", "job-5"]
    await store.close()


async def test_what_a_job_made_its_domains_volumes_and_checkpoints(database_url):
    store = await open_store(database_url)
    for job_id in ("job-1", "job-2"):
        await store.insert_job(_job(job_id))
    made = [OwnedPath("staging", "/srv", "job-1", 1, 10), OwnedPath("file", "/srv", "a.img", 1, 11)]
    for owned in made:
        await store.record_owned("job-1", owned)
    await store.forget_owned("job-1", made[0])
    assert await store.owned_paths("job-1") == made[1:]
    await store.record_domain("job-1", "qemu:///system", "uuid-1", "/var/log/c.log")
    assert await store.owned_domains("job-1") == [("qemu:///system", "uuid-1", "/var/log/c.log")]
    await store.forget_domains("job-1")
    assert await store.owned_domains("job-1") == []
    uri = "qemu+ssh://root@kvm2/system?keyfile=/k"
    for name in ("vm-disk0.qcow2", "vm-disk1.qcow2", "taken.qcow2"):
        await store.record_volume("job-1", uri, "default", name)
    await store.forget_volume("job-1", uri, "default", "taken.qcow2")  # its create was refused
    assert await store.owned_volumes("job-1") == [(uri, "default", "vm-disk0.qcow2"),
                                                  (uri, "default", "vm-disk1.qcow2")]
    await store.forget_volumes("job-1")
    assert await store.owned_volumes("job-1") == []
    for offset, final in ((100, False), (200, True)):
        await store.save_checkpoint("job-1", "disk.bin", ".disk.part", '"etag"',
                                    Checkpoint(offset, f"sha-{offset}", final))
    await store.save_checkpoint("job-1", "other.bin", ".other.part", "", Checkpoint(50, "sha-50"))
    job = await store.get_job("job-1")
    job.status = "failed"
    await store.set_status(job)
    assert [job.id for job in await store.jobs_keeping_downloads()] == ["job-1"]
    assert await store.resumable_bytes("job-1") == 250
    assert await store.checkpoint_names("job-1") == {"disk.bin", ".disk.part", "other.bin",
                                                     ".other.part"}
    await store.hand_over("job-1", "job-2")
    assert await store.saved_downloads("job-1") == {}
    assert await store.saved_downloads("job-2") == {
        "disk.bin": SavedDownload(".disk.part", '"etag"', [Checkpoint(100, "sha-100"),
                                                           Checkpoint(200, "sha-200", True)]),
        "other.bin": SavedDownload(".other.part", "", [Checkpoint(50, "sha-50")])}
    assert await store.owned_paths("job-2") == made[1:]
    await store.clear_checkpoints("job-2", "disk.bin")
    assert await store.resumable_bytes("job-2") == 50
    await store.clear_checkpoints("job-2")
    assert await store.checkpoint_names("job-2") == set()
    await store.close()


async def _claim_all(store: Store) -> list[str]:
    """Claim one job at a time until none is pending; the ids claimed."""
    claimed = []
    while jobs := await store.claim_pending():
        claimed.extend(job.id for job in jobs)
        await asyncio.sleep(0)  # the other store's turn (SQLite's calls do not wait)
    await store.close()
    return claimed


async def test_two_stores_on_one_database_never_claim_a_job_twice(database_url):
    submitter = await open_store(database_url)
    for number in range(40):
        await submitter.insert_job(_job(f"job-{number:02}"))
    claimers = [await open_store(database_url) for _ in range(2)]
    claimed = await asyncio.gather(*(_claim_all(store) for store in claimers))
    every = claimed[0] + claimed[1]
    assert sorted(every) == [f"job-{number:02}" for number in range(40)]  # none twice
    assert claimed[0] and claimed[1]
    assert (await submitter.count_by_status())["running"] == 40
    assert (await submitter.status_history("job-07"))[-1][1:] == ("running", "claimed")
    await submitter.close()


async def test_a_claim_on_postgresql_skips_the_jobs_another_instance_is_claiming(postgres):
    url = postgres.new_database()
    first, second = await open_store(url), await open_store(url)
    for number in range(1, 4):
        await first.insert_job(JobRecord(id=f"job-{number}", kind="sleep", status="pending",
                                         definition={}, created_at=float(number)))
    async with first.transaction() as db:  # as first's claim holds the oldest row, mid-transaction
        await db.execute("SELECT id FROM jobs WHERE id='job-1' FOR UPDATE")
        assert [job.id for job in await second.claim_pending(1)] == ["job-2"]  # no wait, no job-1
    assert [job.id for job in await first.claim_pending(5)] == ["job-1", "job-3"]
    await first.close()
    await second.close()


async def test_instances_starting_together_migrate_a_new_postgresql_database_once(postgres):
    url = postgres.new_database()

    async def open_together() -> int:
        store = await open_store(url)
        version = await store.schema_version()
        await store.close()
        return version

    versions = await asyncio.gather(*(open_together() for _ in range(3)))
    assert versions == [len(store_module.MIGRATIONS)] * 3


async def test_a_job_recovered_elsewhere_is_listed_while_it_holds_a_file_a_domain_or_a_volume(
        database_url):
    """What instance a's restart must still remove of its jobs that b recovered."""
    store = await open_store(database_url)
    made = {"job-path": lambda: store.record_owned("job-path", OwnedPath(
                "file", "/var/lib/x", "a.part", 1, 2)),
            "job-domain": lambda: store.record_domain("job-domain", "qemu:///system",
                                                      "0b5e3f5e-0000-4000-8000-000000000001", ""),
            "job-volume": lambda: store.record_volume("job-volume", "qemu+ssh://kvm2/system",
                                                      "default", "vm-disk0.qcow2"),
            "job-nothing": lambda: asyncio.sleep(0)}
    for job_id, record in made.items():
        await store.insert_job(_job(job_id))
        (job,) = await store.claim_pending(1, "a")
        await record()
        job.status, job.recovered_by = "failed", "b"
        assert await store.end_if(job, "running", reason="recovered by b")
    assert sorted(await store.recovered_elsewhere("a")) == ["job-domain", "job-path", "job-volume"]
    assert await store.recovered_elsewhere("b") == []
    await store.close()


async def test_a_write_made_without_awaiting_comes_before_every_call_made_after_it(
        database_url):
    """Store.soon (a job's log line, from code that does not await) takes its turn when
    it is made: the read made next sees it."""
    store = await open_store(database_url)
    await store.insert_job(_job())
    written = store.soon(store.append_log, "job-1", 1.0, "info", "first")
    assert [line.message for line in await store.logs("job-1")] == ["first"]
    assert (await written) == (await store.logs("job-1"))[0].id
    await store.close()


async def test_a_call_never_lands_inside_another_coroutine_s_transaction(database_url):
    """One connection per store: a call made while another coroutine's transaction is
    open waits for it to end (here rolled back), and never sees its rows."""
    store = await open_store(database_url)
    await store.insert_job(_job("job-1"))

    async def count() -> int:
        return await store.count_jobs()
    with pytest.raises(RuntimeError):
        async with store.transaction() as db:
            await db.execute("INSERT INTO jobs (id, kind, status, definition, created_at)"
                             " VALUES ('job-2', 'sleep', 'pending', '{}', 0)")
            counting = asyncio.create_task(count())
            await asyncio.sleep(0)  # a yield: the other coroutine makes its call now
            raise RuntimeError("rolled back")
    assert await counting == 1
    await store.close()
