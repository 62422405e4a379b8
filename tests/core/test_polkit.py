"""polkit decides, per caller bus name: real polkitd, real users, busctl as those users."""
from __future__ import annotations

import json
import pwd
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import yaml

from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, busctl, gdbus_call,
                           gdbus_submit, job_property, submit, wait_for_status)
from ..support.system import ADMIN, MEMBER, OUTSIDER

ACCESS_DENIED = "Access denied"


def _db_jobs(hypervisord) -> list[tuple]:
    config = yaml.safe_load(hypervisord.config_path.read_text())
    with sqlite3.connect(config["database"]["path"]) as db:
        return db.execute("SELECT id, started_by_uid FROM jobs").fetchall()


def test_member_may_submit_and_cancel_outsider_may_not(system_bus, hypervisord, users):
    address = system_bus.address
    slow = {"steps": 100, "interval": 0.1}
    reply = submit(address, slow, kind="sleep", user=MEMBER)
    path = json.loads(reply.stdout.split()[1])
    assert _db_jobs(hypervisord) == [(path.rsplit("/", 1)[1].replace("_", "-"), users[MEMBER])]

    refused = submit(address, slow, kind="sleep", user=OUTSIDER, check=False)
    assert refused.returncode != 0 and ACCESS_DENIED in refused.stderr
    refused = gdbus_submit(address, slow, kind="sleep", user=OUTSIDER)
    assert "org.freedesktop.DBus.Error.AccessDenied: not authorized for " \
           "org.hypersdk.HyperSDK1.export" in refused.stderr
    refused_cancel = busctl(address, "call", BUS_NAME, path, JOB_IFACE, "Cancel", "a{sv}", "0",
                            user=OUTSIDER, check=False)
    assert ACCESS_DENIED in refused_cancel.stderr
    for method, signature, args in (("ListJobs", "a{sv}", ["0"]),
                                    ("Convert", "sa{sv}", ["{}", "0"]),
                                    ("ImportToKvm", "sa{sv}", ["{}", "0"]),
                                    ("CreateSchedule", "sa{sv}", ["{}", "0"]),
                                    ("CreateBackupPolicy", "sa{sv}", ["{}", "0"]),
                                    ("ConfigureWebhook", "sa{sv}", ["{}", "0"])):
        result = busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, method, signature,
                        *args, user=OUTSIDER, check=False)
        assert ACCESS_DENIED in result.stderr, (method, result.stderr)
    assert len(_db_jobs(hypervisord)) == 1  # nothing changed

    busctl(address, "call", BUS_NAME, path, JOB_IFACE, "Cancel", "a{sv}", "0", user=MEMBER)
    assert wait_for_status(address, path, {"cancelled", "completed", "failed"}) == "cancelled"


def test_cancelling_another_users_job_needs_the_other_user_action(system_bus, hypervisord, users):
    address = system_bus.address
    path = json.loads(submit(address, {"steps": 100, "interval": 0.1}, kind="sleep",
                             user=ADMIN).stdout.split()[1])
    refused = gdbus_call(address, path, f"{JOB_IFACE}.Cancel", "{}", user=MEMBER)
    assert "AccessDenied: not authorized for org.hypersdk.HyperSDK1.cancel-job-other-user" \
        in refused.stderr
    assert job_property(address, path, "Status") in ("pending", "running")  # refused: untouched
    busctl(address, "call", BUS_NAME, path, JOB_IFACE, "Cancel", "a{sv}", "0", user=ADMIN)
    assert wait_for_status(address, path, {"cancelled", "completed", "failed"}) == "cancelled"


def test_started_by_uid_is_the_callers(system_bus, hypervisord, users):
    path = json.loads(submit(system_bus.address, {"steps": 1}, kind="sleep",
                             user=MEMBER).stdout.split()[1])
    reply = json.loads(busctl(system_bus.address, "--json=short", "get-property", BUS_NAME, path,
                              JOB_IFACE, "StartedByUID").stdout)
    assert reply["data"] == pwd.getpwnam(MEMBER).pw_uid


def test_overlapping_callers_each_get_their_own_answer(system_bus, hypervisord, users):
    """Member and outsider call at the same moment, many times over: no mix-ups."""
    address = system_bus.address

    def call(user: str) -> tuple[str, subprocess.CompletedProcess]:
        return user, submit(address, {"steps": 1, "interval": 0.0}, kind="sleep", user=user,
                            check=False)

    callers = [MEMBER, OUTSIDER] * 40
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, callers))
    for user, result in results:
        if user == MEMBER:
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("o ")
        else:
            assert result.returncode != 0 and ACCESS_DENIED in result.stderr
    rows = _db_jobs(hypervisord)
    assert len(rows) == 40
    assert {uid for _, uid in rows} == {users[MEMBER]}


def test_polkitd_knows_every_action_and_the_rules_grant_the_group(system_bus, polkitd, users):
    from lxml import etree
    from ..support.system import REPO
    actions = etree.parse(str(REPO / "polkit/org.hypersdk.HyperSDK1.policy")).xpath("//action/@id")
    assert len(actions) == 11
    listed = subprocess.run(["pkaction"], capture_output=True, text=True, env=system_bus.env())
    assert set(actions) <= set(listed.stdout.split())
    admin_only = {"org.hypersdk.HyperSDK1.cancel-job-other-user",
                  "org.hypersdk.HyperSDK1.manage-providers"}
    for action in actions:
        for user, allowed in ((MEMBER, action not in admin_only), (OUTSIDER, False), (ADMIN, True)):
            check = subprocess.run(
                ["runuser", "-u", user, "--", "sh", "-c",
                 f"exec pkcheck --action-id {action} --process $$"],
                capture_output=True, text=True, env=system_bus.env())
            assert (check.returncode == 0) == allowed, (user, action, check.stderr)
