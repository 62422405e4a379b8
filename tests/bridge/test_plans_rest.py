"""/plans over REST through a real bridge and hypervisord: create, a paged list, one plan,
its preflight, start, the per-VM table as it ends, the report; errors name the field.
The two VMs are defined in the real libvirtd, not booted."""
from __future__ import annotations

import pytest

from tests.plans.conftest import daemon_overrides, plan_sim, targets  # noqa: F401 - fixtures
from tests.support.wait import wait_for_value

from .stack import curl, post_json

pytestmark = pytest.mark.slow


def test_a_plan_over_rest_from_create_to_report(start_bridge, plan_sim, targets,  # noqa: F811
                                                bridge_account):
    bridge = start_bridge(**daemon_overrides(plan_sim.sim, targets.uri))
    vms = plan_sim.placed[8]
    body = {"name": "rest-plan", "provider": "vsphere", "vms": [vm["name"] for vm in vms],
            "network_map": targets.network_map(),
            "storage_map": {"*": {"directory": str(targets.dirs[1])}},
            "limits": {"per_plan": 1}}
    bad = post_json(bridge, "/plans", {**body, "storage_map": {"*": {"directory": "/etc"}}})
    assert bad.status == 400 and "storage_map.*.directory" in bad.body
    created = post_json(bridge, "/plans", body)
    assert created.status == 200, created.body
    plan_id = created.json()["id"]
    assert post_json(bridge, "/plans", body).status == 409  # the name is taken

    listed = curl(bridge, "/plans?limit=1&offset=0").json()
    assert listed["total"] == 1 and [p["id"] for p in listed["plans"]] == [plan_id]
    assert curl(bridge, "/plans?limit=1&offset=1").json()["plans"] == []
    assert curl(bridge, "/plans/plan-nope").status == 404

    preflight = post_json(bridge, f"/plans/{plan_id}/preflight", {})
    assert preflight.status == 200 and preflight.json()["ok"] is True
    assert post_json(bridge, f"/plans/{plan_id}/start", {}).json() == {
        "id": plan_id, "start_requested": True}
    plan = wait_for_value(lambda: curl(bridge, f"/plans/{plan_id}").json(),
                          lambda plan: plan["status"] in ("completed", "failed"), 120,
                          f"plan {plan_id} to end")
    assert plan["status"] == "completed"
    assert [vm["state"] for vm in plan["vms"]] == ["completed", "completed"]
    report = curl(bridge, f"/plans/{plan_id}/report").json()
    assert report["moved"] == 2 and report["final"] is True
    assert report["report_path"] == plan["report_path"] != ""
    ended = post_json(bridge, f"/plans/{plan_id}/cancel", {})
    assert ended.status == 400 and "has already completed" in ended.body
