"""Schedules against a real store and engine, driven by a fake clock (the edge cases)."""
from __future__ import annotations

import logging
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from hypersdk.service.errors import AlreadyExists, InvalidArgument
from hypersdk.service.cron import CronSpec, decide
from hypersdk.service.schedules import Schedules

from .conftest import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")
QUICK = {"steps": 1, "interval": 0.01, "step_bytes": 1}


def at(*fields, tz=BERLIN) -> float:
    return datetime(*fields, tzinfo=tz).timestamp()


def local(ts: float, tz=BERLIN) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M %Z")


def make(env, clock, grace=600.0):
    events = []
    changed = []

    async def emit(name: str, payload: dict) -> int:
        events.append((name, payload))
        return 1
    schedules = Schedules(env.store, env.engine, grace, clock, emit=emit,
                          changed=changed.append)
    return schedules, events


def definition(**overrides) -> dict:
    base = {"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Berlin",
            "kind": "sleep", "job_definition": dict(QUICK)}
    base.update(overrides)
    return base


# -- cron parsing and DST -------------------------------------------------------------
@pytest.mark.parametrize("cron, field", [
    ("61 * * * *", "cron"), ("* * *", "cron"), ("", "cron"), (5, "cron"), ("@sometimes", "cron"),
    ("0 0 31 2 *", "cron"),
])
def test_invalid_cron_names_the_field(cron, field):
    with pytest.raises(InvalidArgument) as info:
        CronSpec.parse(cron)
    assert info.value.field == field


def test_unknown_timezone_is_refused():
    with pytest.raises(InvalidArgument, match="timezone: unknown IANA time zone 'Mars/Olympus'"):
        CronSpec.parse("@daily", "Mars/Olympus")


def test_names_and_seconds_field_are_accepted():
    start = at(2026, 1, 1, 10, 0, 0)
    assert local(CronSpec.parse("@daily", "Europe/Berlin").next_after(start)) == \
        "2026-01-02 00:00 CET"
    assert CronSpec.parse("* * * * * */10", "UTC").next_after(start) == start + 10


def test_spring_forward_runs_once_when_the_clocks_resume():
    spec = CronSpec.parse("30 2 * * *", "Europe/Berlin")
    first = spec.next_after(at(2026, 3, 28, 12, 0))
    second = spec.next_after(first)
    assert local(first) == "2026-03-29 03:00 CEST"   # 02:30 does not exist that night
    assert local(second) == "2026-03-30 02:30 CEST"


def test_fall_back_fixed_hour_fires_once_but_hourly_keeps_elapsed_time():
    daily = CronSpec.parse("30 2 * * *", "Europe/Berlin")
    first = daily.next_after(at(2026, 10, 24, 12, 0))
    assert local(first) == "2026-10-25 02:30 CEST"
    assert local(daily.next_after(first)) == "2026-10-26 02:30 CET"  # not 02:30 CET on the 25th
    for expression in ("30 * * * *", "@hourly"):
        hourly = CronSpec.parse(expression, "Europe/Berlin")
        slots = [hourly.next_after(at(2026, 10, 25, 1, 45))]
        for _ in range(3):
            slots.append(hourly.next_after(slots[-1]))
        assert [b - a for a, b in zip(slots, slots[1:])] == [3600, 3600, 3600]


def test_decide_latest_missed_slot_within_grace_fires_once():
    spec = CronSpec.parse("0 * * * *", "UTC")
    last = at(2026, 1, 1, 0, 0, tz=ZoneInfo("UTC"))
    now = last + 3 * 3600 + 120  # three slots passed, the latest 2 minutes ago
    decision = decide(spec, last, now, grace=600)
    assert decision.fire and decision.missed_earlier and decision.slot == last + 3 * 3600
    assert decide(spec, decision.slot, now, grace=600) is None  # never twice
    late = decide(spec, last, last + 3 * 3600 + 1200, grace=600)
    assert not late.fire


# -- schedules with a real engine ------------------------------------------------------
async def test_create_validates_and_refuses_duplicates(env):
    schedules, _ = make(env, FakeClock(at(2026, 1, 1, 12, 0)))
    for bad, field in [({"name": "x", "cron": "0 2 * * *"}, "job_definition"),
                       (definition(color="red"), "color"),
                       (definition(kind="nope"), "kind"),
                       (definition(job_definition={"steps": 1, "bogus": 1}),
                        "job_definition.bogus"),
                       (definition(enabled="yes"), "enabled")]:
        with pytest.raises(InvalidArgument) as info:
            await schedules.create(bad, 0)
        assert info.value.field == field
    await schedules.create(definition(), 0)
    with pytest.raises(AlreadyExists):
        await schedules.create(definition(), 0)


async def test_fires_at_its_slot_links_the_job_and_emits_the_event(env):
    clock = FakeClock(at(2026, 1, 1, 12, 0))
    schedules, events = make(env, clock)
    schedule = await schedules.create(definition(), 1000)
    assert local(schedule.next_run) == "2026-01-02 02:00 CET"
    clock.t = at(2026, 1, 2, 1, 59)
    await schedules.tick()
    assert await schedules.jobs(schedule.id) == []
    clock.t = at(2026, 1, 2, 2, 0, 1)
    await schedules.tick()
    await schedules.tick()
    jobs = await schedules.jobs(schedule.id)
    assert len(jobs) == 1
    job = await env.engine.get(jobs[0])
    assert job.kind == "sleep" and job.started_by_uid == 1000
    assert await env.wait_job(job.id) == "completed"
    after = await schedules.get(schedule.id)
    assert after.last_job == job.id and after.last_run == clock.t
    assert local(after.next_run) == "2026-01-03 02:00 CET"
    assert [name for name, _ in events] == ["schedule.triggered"]
    assert events[0][1]["job_id"] == job.id


async def test_missed_run_fires_once_at_start_and_never_twice_after_a_restart(env):
    clock = FakeClock(at(2026, 1, 1, 12, 0))
    schedules, _ = make(env, clock)
    schedule = await schedules.create(definition(cron="0 * * * *"), 0)
    clock.t = at(2026, 1, 1, 15, 5)  # "the service was down": slots 13:00, 14:00, 15:00 passed
    await schedules.tick()
    assert len(await schedules.jobs(schedule.id)) == 1
    restarted, _ = make(env, clock)  # a new scheduler over the same store
    await restarted.tick()
    assert len(await restarted.jobs(schedule.id)) == 1
    assert local((await restarted.get(schedule.id)).next_run) == "2026-01-01 16:00 CET"


async def test_missed_run_beyond_the_grace_period_is_skipped_and_logged(env, caplog):
    clock = FakeClock(at(2026, 1, 1, 12, 0))
    schedules, events = make(env, clock, grace=600)
    schedule = await schedules.create(definition(cron="0 * * * *"), 0)
    clock.t = at(2026, 1, 1, 15, 30)  # latest slot 15:00 is 30 min old
    with caplog.at_level(logging.WARNING):
        await schedules.tick()
    assert await schedules.jobs(schedule.id) == [] and events == []
    assert "missed by more than the grace period" in caplog.text
    assert local((await schedules.get(schedule.id)).next_run) == "2026-01-01 16:00 CET"


async def test_overlap_skips_the_slot_while_the_previous_job_runs(env, caplog):
    clock = FakeClock(at(2026, 1, 1, 12, 0))
    schedules, _ = make(env, clock)
    slow = {"steps": 100, "interval": 0.1, "step_bytes": 1}
    schedule = await schedules.create(definition(cron="* * * * *", job_definition=slow), 0)
    clock.advance(60)
    await schedules.tick()
    first = await schedules.jobs(schedule.id)
    assert len(first) == 1
    clock.advance(60)
    with caplog.at_level(logging.WARNING):
        await schedules.tick()
    assert await schedules.jobs(schedule.id) == first
    assert f"the previous job {first[0]} is still" in caplog.text
    await env.engine.cancel(first[0])
    assert await env.wait_job(first[0]) == "cancelled"
    clock.advance(60)
    await schedules.tick()
    assert len(await schedules.jobs(schedule.id)) == 2


async def test_disabled_schedule_does_not_fire_nor_backfill_when_enabled(env):
    clock = FakeClock(at(2026, 1, 1, 12, 0))
    schedules, _ = make(env, clock)
    schedule = await schedules.create(definition(cron="*/5 * * * *"), 0)
    await schedules.set_enabled(schedule.id, False)
    assert (await schedules.get(schedule.id)).next_run is None
    clock.advance(3600)
    await schedules.tick()
    await schedules.set_enabled(schedule.id, True)
    await schedules.tick()
    assert await schedules.jobs(schedule.id) == []
    clock.advance(300)
    await schedules.tick()
    assert len(await schedules.jobs(schedule.id)) == 1


async def test_run_now_submits_and_delete_keeps_the_jobs(env):
    schedules, events = make(env, FakeClock(at(2026, 1, 1, 12, 0)))
    schedule = await schedules.create(definition(), 0)
    job = await schedules.run_now(schedule.id, 1000)
    assert await schedules.jobs(schedule.id) == [job.id]
    assert events[0][1]["manual"] is True
    await schedules.delete(schedule.id)
    assert (await env.engine.get(job.id)).id == job.id
    assert await schedules.list() == []


async def test_time_placeholder_gives_each_run_its_own_value(env):
    clock = FakeClock(datetime(2026, 1, 1, 11, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    schedules, _ = make(env, clock)
    schedule = await schedules.create(definition(kind="fail", job_definition={"message": "run {time}"},
                                                 cron="0 * * * *"), 0)
    assert (await schedules.get(schedule.id)).job_definition == {"message": "run {time}"}
    clock.advance(3600)
    await schedules.tick()
    manual = await schedules.run_now(schedule.id, 0)
    first = await env.engine.get((await schedules.jobs(schedule.id))[0])
    assert first.definition == {"message": "run 20260101T120000Z"}
    assert manual.definition == {"message": "run 20260101T120000Z"}


async def test_the_specs_nightly_schedule_lands_each_run_in_a_directory_of_its_own(env,
                                                                                   tmp_path):
    clock = FakeClock(datetime(2026, 1, 1, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    schedules, _ = make(env, clock)
    nightly = tmp_path / "exports" / "nightly"  # a fixed export_path, as in the spec's 5.1
    schedule = await schedules.create(definition(
        kind="fake_export", cron="0 2 * * *", timezone="UTC",
        job_definition={"vm_identifier": "vm-123", "provider": "vsphere",
                        "export_path": str(nightly)}), 0)
    clock.advance(14 * 3600)  # 2 January, 02:00 UTC
    for _night in range(2):
        await schedules.tick()
        assert await env.wait_job((await schedules.jobs(schedule.id))[-1]) == "completed"
        clock.advance(24 * 3600)
    jobs = [await env.engine.get(job_id) for job_id in await schedules.jobs(schedule.id)]
    assert [job.definition["export_path"] for job in jobs] == [
        str(nightly / "20260102T020000Z"), str(nightly / "20260103T020000Z")]
    assert sorted(p.name for p in nightly.iterdir()) == ["20260102T020000Z", "20260103T020000Z"]
    assert (await schedules.get(schedule.id)).job_definition["export_path"] == str(nightly)


async def test_a_path_that_places_time_itself_is_kept(env):
    schedules, _ = make(env, FakeClock(at(2026, 1, 1, 12, 0)))
    schedule = await schedules.create(definition(kind="fake_export", job_definition={
        "vm_identifier": "v", "provider": "p", "export_path": "/x/{time}/disks"}), 0)
    job = await schedules.run_now(schedule.id, 0)
    assert job.definition["export_path"] == "/x/20260101T110000Z/disks"
    await env.wait_job(job.id)
