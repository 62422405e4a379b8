"""The engine's error branches on the real JobEngine and Store: a job kind's bug, a kind
gone after a restart, a submit while draining, a listener that raises, what a failed
attempt made, removed before the next one, and a cleanup that must leave a file alone."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypersdk.service import job_kinds
from hypersdk.service.config import parse_config
from hypersdk.service.engine import JobEngine
from hypersdk.service.errors import Failed
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.store import Store

from ..support import test_kinds
from ..support.wait import job_is, until

QUICK = {"steps": 1, "interval": 0}


@contextlib.asynccontextmanager
async def running_engine(tmp_path: Path, **sections) -> AsyncIterator[JobEngine]:
    """A started engine on a store under `tmp_path`, shut down (and the store closed) after."""
    config = parse_config({"database": {"path": str(tmp_path / "jobs.db")},
                           "export": {"base_path": str(tmp_path / "exports")}, **sections},
                          "(test)", env={})
    store = Store(Path(config.database.path))
    engine = JobEngine(store, config, ProviderRegistry(config))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()
        await store.close()


async def finished(engine: JobEngine, job_id: str) -> str:
    await until(lambda: job_is(engine, job_id, lambda job: job.finished),
                what=f"{job_id} to finish")
    return (await engine.get(job_id)).status


async def test_a_bug_in_a_job_fails_it_without_the_traceback_and_the_worker_goes_on(
        tmp_path, caplog):
    async with running_engine(tmp_path, daemon={"workers": 1}) as engine:
        crashed = await engine.submit("crash", {}, uid=0)
        assert await finished(engine, crashed.id) == "failed"
        assert (await engine.get(crashed.id)).error == \
            "internal error (RuntimeError); see the hypervisord journal"
        assert f"job {crashed.id} failed unexpectedly" in caplog.text  # the journal's part
        after = await engine.submit("sleep", QUICK, uid=0)
        assert await finished(engine, after.id) == "completed"  # the only worker lives


async def test_a_job_whose_kind_is_gone_after_a_restart_fails_saying_so(tmp_path, monkeypatch):
    vanishing = type("VanishingKind", (test_kinds.SlottedSleepKind,), {"name": "vanishing"})()
    monkeypatch.setitem(job_kinds._KINDS, "vanishing", vanishing)
    export_one_at_a_time = {"concurrent_exports": 1}
    async with running_engine(tmp_path, export=export_one_at_a_time) as engine:
        holder = await engine.submit("slotted-sleep", {"steps": 1000, "interval": 0.01}, uid=0)
        queued = await engine.submit("vanishing", QUICK, uid=0)  # waits for the only slot
        await until(lambda: job_is(engine, holder.id, lambda job: job.status == "running"),
                    what="the holder")
    monkeypatch.delitem(job_kinds._KINDS, "vanishing")  # e.g. a plugin uninstalled
    async with running_engine(tmp_path, export=export_one_at_a_time) as engine:
        assert await finished(engine, queued.id) == "failed"
        assert (await engine.get(queued.id)).error == "job kind 'vanishing' is not available"


async def test_a_submit_while_shutting_down_is_refused_saying_why(tmp_path):
    async with running_engine(tmp_path) as engine:
        await engine.shutdown()
        with pytest.raises(Failed, match="hypervisord is shutting down; no new jobs are "
                                         "accepted"):
            await engine.submit("sleep", QUICK, uid=0)
        assert await engine.list() == []


async def test_a_listener_that_raises_breaks_neither_the_job_nor_the_other_listeners(
        tmp_path, caplog):
    heard: list[tuple[str, str]] = []

    def broken(event) -> None:
        raise ValueError("a broken listener")

    async with running_engine(tmp_path) as engine:
        engine.subscribe(broken)
        engine.subscribe(lambda event: heard.append((event.type, event.job.status)))
        job = await engine.submit("sleep", QUICK, uid=0)
        assert await finished(engine, job.id) == "completed"
    assert ("status", "completed") in heard
    assert "job listener failed" in caplog.text


async def test_what_a_failed_attempt_made_is_gone_before_the_next_attempt(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    async with running_engine(tmp_path, export={"max_retries": 2}) as engine:
        job = await engine.submit("flaky-writer", {"dir": str(out), "succeed_on": 2}, uid=0)
        assert await finished(engine, job.id) == "completed"
        record = await engine.get(job.id)
    assert record.attempts == 2
    assert record.result == {"found": [f"{job.id}-2.partial"]}  # attempt 1's file was removed
    assert sorted(path.name for path in out.iterdir()) == [f"{job.id}-2.partial"]


async def test_a_cleanup_leaves_a_file_someone_else_put_in_place_and_says_so(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    async with running_engine(tmp_path) as engine:
        job = await engine.submit("replaced-then-fail", {"dir": str(out)}, uid=0)
        assert await finished(engine, job.id) == "failed"
        assert (await engine.get(job.id)).error == "it failed after its file was replaced"
        logged = [(line.level, line.message) for line in await engine.store.logs(job.id)]
    assert (out / f"{job.id}.partial").read_bytes() == b"someone else's"  # not removed
    assert ("warning", f"left {out / job.id}.partial: it is no longer what the job created") \
        in logged
