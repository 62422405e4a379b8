"""Plans in the store, SQLite and PostgreSQL alike: created once by name, read back,
listed, cancelled before they start, with the report written root-only beside the store."""
from __future__ import annotations

import json
import stat

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.engine import JobEngine
from hypersdk.service.errors import AlreadyExists, InvalidArgument, NotFound
from hypersdk.service.plans import Plans
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.store import open_store


@pytest.fixture
async def plans(database_url, tmp_path):
    config = parse_config({"database": {"path": str(tmp_path / "state" / "hypersdk.db"),
                                        "url": database_url},
                           "paths": {"outputs": [str(tmp_path)]}}, "(test)", env={})
    store = await open_store(database_url)
    yield Plans(store, JobEngine(store, config, ProviderRegistry(config)), config)
    await store.close()


async def test_a_plan_is_stored_listed_and_cancelled_with_its_report(plans, tmp_path):
    definition = {"name": "p1", "provider": "ova", "vms": ["a", "b"],
                  "storage_map": {"*": {"directory": str(tmp_path)}}}
    plan = await plans.create(definition, 1000, "unix:someone")
    with pytest.raises(AlreadyExists, match="a plan named 'p1' exists"):
        await plans.create(definition, 1000)
    again = await plans.get(plan.id)
    assert (again.name, again.status, again.created_by_uid, again.requested_by) == (
        "p1", "created", 1000, "unix:someone")
    assert again.definition["limits"]["per_plan"] == 2
    assert [p.id for p in await plans.list()] == [plan.id] and await plans.vms(plan.id) == []

    changed = []
    plans.on_change.append(changed.append)
    cancelled = await plans.cancel(plan.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at and changed == [plan.id]
    with pytest.raises(InvalidArgument, match="has already cancelled"):
        await plans.cancel(plan.id)
    report_path = tmp_path / "state" / "plan-reports" / f"{plan.id}.json"
    assert (await plans.get(plan.id)).report_path == str(report_path)
    assert json.loads(report_path.read_text())["status"] == "cancelled"
    assert stat.S_IMODE(report_path.parent.stat().st_mode) == 0o700
    with pytest.raises(NotFound, match="no plan 'plan-none'"):
        await plans.get("plan-none")
