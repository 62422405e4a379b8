"""Who may do what with a plan, decided by the real polkitd per method: group hypersdk
creates and reads plans, others are refused naming the action; cancelling another
user's plan (its jobs are theirs) needs cancel-job-other-user, as for jobs."""
from __future__ import annotations

import json

from hypersdk.client.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, PLAN_IFACE, plan_path
from tests.support.cli import busctl, gdbus_call, gvariant_string
from tests.support.system import ADMIN, MEMBER, OUTSIDER

PLAN = {"provider": "ova", "vms": ["x"],
        "storage_map": {"*": {"directory": "/var/lib/libvirt/images"}}}


def _create(address: str, name: str, user: str | None = None):
    return gdbus_call(address, MANAGER_PATH, f"{MANAGER_IFACE}.CreatePlan",
                      gvariant_string(json.dumps({**PLAN, "name": name})), "{}", user=user)


def _cancel(address: str, plan_id: str, user: str):
    return gdbus_call(address, plan_path(plan_id), f"{PLAN_IFACE}.Cancel", "{}", user=user)


def _plan_id(reply) -> str:
    assert reply.returncode == 0, reply.stderr
    return reply.stdout.split("'")[1].rsplit("/", 1)[-1].replace("_", "-")


def test_plan_methods_are_authorised_per_caller(system_bus, hypervisord, users):
    address = system_bus.address
    refused = _create(address, "outsiders", user=OUTSIDER)
    assert refused.returncode != 0 and "AccessDenied" in refused.stderr
    members = _plan_id(_create(address, "members", user=MEMBER))
    roots = _plan_id(_create(address, "roots"))

    other = _cancel(address, roots, MEMBER)
    assert other.returncode != 0
    assert "org.hypersdk.HyperSDK1.cancel-job-other-user" in other.stderr
    assert _cancel(address, members, MEMBER).returncode == 0
    assert _cancel(address, roots, ADMIN).returncode == 0
    for plan_id in (members, roots):
        status = busctl(address, "get-property", BUS_NAME, plan_path(plan_id), PLAN_IFACE,
                        "Status").stdout.split()
        assert status == ["s", '"cancelled"']
