"""Backup policies over the vSphere simulator's VMs, with retention over real files.

The main test runs the product's real "export" jobs against tagged simulator VMs
that have real (small) disks. The edge cases (age, failures, dry run, overlap) run
the backups as "fake_export" (below), which writes one small real file where the
policy said and can fail on demand; the inventory, tags, engine, store and files
are real there too.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hypersdk.service.backup_policies import Backup, BackupPolicies, plan_retention
from hypersdk.service.errors import InvalidArgument, Unavailable
from hypersdk.service.jobs import export as _export_kind# noqa: F401 (registers "export")

from ..support.wait import until
from .conftest import PRODUCTION, FakeClock, make_config, start_engine, stop_engine

DAY = 86400.0


async def _policies_env(tmp_path, sim, kind: str, database_url: str = ""):
    config = make_config(tmp_path, providers={"vsphere": sim.provider_settings()},
                         database={"url": database_url})
    env = await start_engine(config)
    clock = FakeClock(1_800_000_000.0)
    events: list[tuple[str, dict]] = []
    policies = BackupPolicies(env.store, env.engine, 600.0, clock,
                              emit=_recorder(events),
                              changed=lambda item: None, kind=kind)
    env.engine.subscribe(policies.on_job_event)
    return env, policies, clock, events


@pytest.fixture
async def policies_env(tmp_path, tagged_sim, database_url):
    """Policies whose backups run as fake_export, on each store (SQLite, PostgreSQL)."""
    env, policies, clock, events = await _policies_env(tmp_path, tagged_sim, "fake_export",
                                                       database_url)
    yield env, policies, clock, events
    await policies.close()
    await stop_engine(env)


@pytest.fixture
async def export_policies_env(tmp_path, tagged_sim):
    """Policies whose backups are the product's export jobs."""
    env, policies, clock, events = await _policies_env(tmp_path, tagged_sim, "export")
    yield env, policies, clock, events
    await policies.close()
    await stop_engine(env)


def production_policy(**overrides) -> dict:
    definition = {"name": "production-vms", "provider": "vsphere",
                  "vm_filter": {"tags": ["backup=production"]}, "retention": {"count": 2}}
    definition.update(overrides)
    return definition


async def run_and_settle(env, policies, policy_id: str) -> list:
    jobs = await policies.run(policy_id, 0)
    statuses = [await env.wait_job(job.id) for job in jobs]
    # the engine's listener settles the run, then retention runs in a task
    await until(lambda: _settled(env, policies, policy_id), what="the policy's retention task")
    return statuses


async def _settled(env, policies: BackupPolicies, policy_id: str) -> bool:
    return (not await policies._active(policy_id) and not env.engine._follow_ups
            and not policies._tasks)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}



def _recorder(events: list) -> Callable[[str, dict], Awaitable[int]]:
    """BackupPolicies' `emit`: the webhook events, in a list."""
    async def emit(name: str, payload: dict) -> int:
        events.append((name, payload))
        return 1
    return emit


async def _backups_are(policies: BackupPolicies, policy_id: str, count: int,
                       states: tuple[str, ...] = ("pending", "good", "failed")) -> bool:
    return len(await policies.backups(policy_id, states)) == count

async def test_four_runs_keep_the_two_newest_backups_and_foreign_files(export_policies_env):
    env, policies, clock, events = export_policies_env
    policy = await policies.create(production_policy(export_options={"export_method": "disk"}), 0)
    root = policy.root
    (root / "DC0_H0_VM0").mkdir(parents=True)
    (root / "DC0_H0_VM0" / "notes.txt").write_text("mine, not the policy's")
    (root / "README").write_text("foreign")
    for _ in range(4):
        assert await run_and_settle(env, policies, policy.id) == ["completed", "completed"]
        clock.advance(DAY)
    all_made = await policies.backups(policy.id, ("good", "deleted"))
    assert sorted({b.vm_name for b in all_made}) == sorted(PRODUCTION)
    for vm in PRODUCTION:
        dirs = sorted(p.name for p in (root / vm).iterdir() if p.is_dir())
        mine = [b for b in all_made if b.vm_name == vm]
        assert len(mine) == 4
        assert dirs == sorted(Path(b.path).name for b in mine[-2:])
    for backup in await policies.backups(policy.id, ("good",)):
        files = sorted(p.name for p in Path(backup.path).iterdir())
        assert files == [f"{backup.vm_name}-disk1.vmdk", f"{backup.vm_name}.mf"], files
    assert (root / "README").read_text() == "foreign"
    assert (root / "DC0_H0_VM0" / "notes.txt").exists()
    retention_events = [p for name, p in events if name == "backup.retention_applied"]
    assert len(retention_events) == 4
    assert [len(p["deleted"]) for p in retention_events] == [0, 0, 2, 2]


async def test_retention_by_age_never_removes_the_newest_good_backup(policies_env):
    env, policies, clock, _ = policies_env
    policy = await policies.create(production_policy(retention={"age_days": 1.5}), 0)
    for _ in range(3):
        await run_and_settle(env, policies, policy.id)
        clock.advance(DAY)
    good = await policies.backups(policy.id, ("good",))
    assert len(good) == 4  # the day-0 backups were older than 1.5 days at the third run
    clock.advance(30 * DAY)
    deleted = await policies.apply_retention(policy.id)
    assert len(deleted) == 2
    newest = await policies.backups(policy.id, ("good",))
    assert len(newest) == 2 and all(Path(b.path, "disk.img").exists() for b in newest)


def test_plan_retention_rules():
    def backup(i, vm, age_days, state="good"):
        return Backup(i, "p", "r", vm, vm, f"job-{i}", f"/b/{i}", 1000 * DAY - age_days * DAY,
                      state)
    rows = [backup(1, "a", 9), backup(2, "a", 5), backup(3, "a", 1), backup(4, "a", 0, "failed"),
            backup(5, "b", 40)]
    now = 1000 * DAY
    assert [b.id for b in plan_retention(rows, {"count": 2}, now)] == [1]
    assert [b.id for b in plan_retention(rows, {"age_days": 3}, now)] == [2, 1]
    assert plan_retention(rows, {}, now) == []
    assert [b.id for b in plan_retention(rows, {"count": 1, "age_days": 30}, now)] == [2, 1]


async def test_a_run_with_a_failed_job_applies_no_retention(policies_env):
    env, policies, clock, events = policies_env
    policy = await policies.create(production_policy(retention={"count": 1}), 0)
    await run_and_settle(env, policies, policy.id)
    clock.advance(DAY)
    await run_and_settle(env, policies, policy.id)  # a second good run: retention applies
    assert len(await policies.backups(policy.id, ("good",))) == 2
    vm_id = (await policies.backups(policy.id, ("good",)))[0].vm
    broken = await policies.create(production_policy(name="broken", retention={"count": 1},
                                                     export_options={"fail": vm_id}), 0)
    await run_and_settle(env, policies, broken.id)
    clock.advance(DAY)
    await run_and_settle(env, policies, broken.id)
    assert len(await policies.backups(broken.id, ("good",))) == 2  # 1 per run for the healthy VM
    assert len(await policies.backups(broken.id, ("failed",))) == 2
    assert [p["policy_id"] for n, p in events if n == "backup.retention_applied"] == \
        [policy.id, policy.id]


async def test_dry_run_lists_vms_and_what_retention_would_delete(policies_env):
    env, policies, clock, _ = policies_env
    policy = await policies.create(production_policy(retention={"count": 1}), 0)
    plan = await policies.dry_run(policy.id)
    assert sorted(v["name"] for v in plan["vms"]) == sorted(PRODUCTION)
    assert plan["retention_would_delete"] == []
    await run_and_settle(env, policies, policy.id)
    clock.advance(DAY)
    plan = await policies.dry_run(policy.id)
    first = {b.path for b in await policies.backups(policy.id, ("good",))}
    assert {b["path"] for b in plan["retention_would_delete"]} == first
    assert all(Path(p).exists() for p in first)  # a dry run deletes nothing


async def test_overlapping_run_is_refused_and_scheduled_slot_skipped(policies_env, caplog):
    env, policies, clock, _ = policies_env
    policy = await policies.create(production_policy(schedule="0 3 * * *", timezone="UTC"), 0)
    assert policy.next_run is not None
    jobs = await policies.run(policy.id, 0)
    with pytest.raises(Unavailable, match="previous run is still going"):
        await policies.run(policy.id, 0)
    clock.t = policy.next_run + 1
    await policies.tick()
    assert "skipped: the previous run is still going" in caplog.text
    for job in jobs:
        await env.wait_job(job.id)
    clock.t = (await policies.get(policy.id)).next_run + 1
    await policies.tick()
    await until(lambda: _backups_are(policies, policy.id, 4), 10,
                "the scheduled run's backups")


@pytest.mark.parametrize("overrides, field", [
    ({"retention": {"count": -1}}, "retention.count"),
    ({"retention": {"age_days": -3}}, "retention.age_days"),
    ({"retention": {"count": 2, "keep": 1}}, "retention.keep"),
    ({"schedule": "0 25 * * *"}, "schedule"),
    ({"timezone": "Nowhere/Land"}, "timezone"),
    ({"vm_filter": ["production"]}, "vm_filter"),
    ({"export_options": {"vm_identifier": "x"}}, "export_options.vm_identifier"),
    ({"export_options": {"colour": "x"}}, "export_options.colour"),
    ({"export_path": "relative/dir"}, "export_path"),
    ({"owner": "bob"}, "owner"),
])
async def test_bad_policies_are_refused_naming_the_field(policies_env, overrides, field):
    _, policies, _, _ = policies_env
    with pytest.raises(InvalidArgument) as info:
        await policies.create(production_policy(**overrides), 0)
    assert info.value.field == field


async def test_a_disabled_policy_is_skipped_by_its_schedule_but_runs_when_asked(policies_env):
    env, policies, clock, _ = policies_env
    policy = await policies.create(production_policy(schedule="0 3 * * *", timezone="UTC"), 0)
    slot = policy.next_run
    assert (await policies.set_enabled(policy.id, False)).next_run is None
    assert await policies.next_due() is None
    clock.t = slot + 1
    await policies.tick()
    assert not policies._tasks and await policies.backups(policy.id) == []
    assert (await policies.set_enabled(policy.id, True)).next_run == slot + DAY  # no backfill
    await policies.tick()
    assert not policies._tasks and await policies.backups(policy.id) == []
    await policies.set_enabled(policy.id, False)
    assert await run_and_settle(env, policies, policy.id) == ["completed", "completed"]
    assert not (await policies.get(policy.id)).enabled


async def test_a_slot_claimed_by_another_instance_is_not_run_twice(policies_env):
    """Two services on one store both see the slot due; the one that loses the claim (its
    view of last_slot is stale) runs nothing."""
    env, policies, clock, _ = policies_env
    other = BackupPolicies(env.store, env.engine, 600.0, clock, emit=_recorder([]),
                           changed=lambda item: None, kind=policies.kind)
    policy = await policies.create(production_policy(schedule="0 3 * * *", timezone="UTC"), 0)
    clock.t = policy.next_run + 1
    stale = await other.get(policy.id)
    await policies.tick()
    await until(lambda: _backups_are(policies, policy.id, 2, ("good",)), 10,
                "the first run's backups to be done")  # so the other is not merely busy
    await other._tick_one(stale, clock.now())
    await asyncio.gather(*list(other._tasks))
    assert len(await policies.backups(policy.id)) == 2
    assert (await policies.get(policy.id)).last_slot == clock.t - 1
