"""Schedules, backup policies and webhooks through a real hypervisord on the private bus."""
from __future__ import annotations

import asyncio
import json
import time

from dbus_fast import Message

from hypersdk.client.names import BACKUP_POLICY_IFACE, SCHEDULE_IFACE, WEBHOOK_IFACE

from ..support.cli import (BUS_NAME, MANAGER, MANAGER_IFACE, busctl, busctl_json, gdbus_call,
                           gvariant_string, job_property, submit)
from ..support.introspection import documented, live
from ..support.wait import until, wait_for_value, wait_until
from .conftest import PRODUCTION

POLICY_IFACE = BACKUP_POLICY_IFACE
ROOT = "/org/hypersdk/HyperSDK1"
MEMBER = "hsdk-member"
SECRET = "hmac-secret-value"
QUICK = {"steps": 1, "interval": 0.01, "step_bytes": 1}
# the receivers are on 127.0.0.1, which webhooks reach only when it is named
FAST_WEBHOOKS = {"webhook_retry_base": 0.2, "webhook_timeout": 2,
                 "webhook_private_targets": ["127.0.0.1"]}


def create(address: str, method: str, definition: dict, user: str | None = MEMBER) -> str:
    reply = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, method, "sa{sv}",
                        json.dumps(definition), "0", user=user)
    return reply["data"][0]


def create_error(address: str, method: str, definition: dict, user: str = MEMBER) -> str:
    result = gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.{method}",
                        gvariant_string(json.dumps(definition)), "{}", user=user)
    assert result.returncode != 0, result.stdout
    return result.stderr


def prop(address: str, path: str, interface: str, name: str):
    return busctl_json(address, "get-property", BUS_NAME, path, interface, name)["data"]


def call(address: str, path: str, interface: str, method: str, *args: str,
         user: str | None = MEMBER) -> list:
    out = busctl(address, "--json=short", "call", BUS_NAME, path, interface, method, *args,
                 user=user).stdout
    return json.loads(out)["data"] if out.strip() else []


def deliveries(address: str, path: str) -> list[dict]:
    """The webhook at `path`'s delivery log, as GetDeliveries tells it."""
    return json.loads(call(address, path, WEBHOOK_IFACE, "GetDeliveries", "a{sv}", "0")[0])


def managed_objects(address: str) -> dict:
    return busctl_json(address, "call", BUS_NAME, ROOT, "org.freedesktop.DBus.ObjectManager",
                       "GetManagedObjects")["data"][0]


def test_a_cron_schedule_fires_on_each_slot_with_linked_jobs(system_bus, hypervisord):
    address = system_bus.address
    created_at = time.time()
    path = create(address, "CreateSchedule", {
        "name": "every-two-seconds", "cron": "* * * * * */2", "timezone": "UTC",
        "kind": "sleep", "job_definition": QUICK})
    assert path.startswith(ROOT + "/schedules/schedule_")
    assert live(address, path, SCHEDULE_IFACE) == documented(SCHEDULE_IFACE)
    next_run = prop(address, path, SCHEDULE_IFACE, "NextRun")
    read_at = time.time()
    # a slot (an even second) after the schedule was made, at most one period after this
    # read however slow the calls were
    assert next_run % 2_000_000 == 0 and created_at * 1e6 < next_run <= read_at * 1e6 + 2e6
    first = wait_until(lambda: (j := prop(address, path, SCHEDULE_IFACE, "LastJob")) != "/" and j,
                       what="the first run")
    second = wait_until(lambda: (j := prop(address, path, SCHEDULE_IFACE, "LastJob")) != first
                        and j, what="the second run")
    for job in (first, second):
        assert wait_until(lambda: job_property(address, job, "Status") == "completed",
                          what=f"{job} to complete")
    fired_at = [job_property(address, job, "CreatedTime") for job in (first, second)]
    # one job per slot (even seconds): the second run on a later slot than the first
    slots = [int(usec // 2_000_000) for usec in fired_at]
    assert slots[1] > slots[0], fired_at
    definition = json.loads(prop(address, path, SCHEDULE_IFACE, "Definition"))
    assert definition["cron"] == "* * * * * */2" and definition["kind"] == "sleep"
    call(address, path, SCHEDULE_IFACE, "SetEnabled", "ba{sv}", "false", "0")
    assert prop(address, path, SCHEDULE_IFACE, "Enabled") is False
    assert prop(address, path, SCHEDULE_IFACE, "NextRun") == 0
    # that a disabled schedule lets its slots pass is test_schedules.py's, on a fake clock
    [manual] = call(address, path, SCHEDULE_IFACE, "RunNow", "a{sv}", "0")
    assert prop(address, path, SCHEDULE_IFACE, "LastJob") == manual
    assert path in managed_objects(address)
    call(address, path, SCHEDULE_IFACE, "Delete", "a{sv}", "0")
    assert path not in managed_objects(address)


def test_schedules_survive_a_restart(system_bus, start_hypervisord):
    address = system_bus.address
    daemon = start_hypervisord()
    path = create(address, "CreateSchedule", {"name": "nightly", "cron": "@daily",
                                              "kind": "sleep", "job_definition": QUICK})
    next_run = prop(address, path, SCHEDULE_IFACE, "NextRun")
    daemon.stop()
    start_hypervisord()
    assert prop(address, path, SCHEDULE_IFACE, "NextRun") == next_run
    assert prop(address, path, SCHEDULE_IFACE, "LastJob") == "/"
    assert prop(address, path, SCHEDULE_IFACE, "Name") == "nightly"


def test_bad_input_is_a_clear_error_naming_the_field(system_bus, hypervisord):
    address = system_bus.address
    error = "org.hypersdk.HyperSDK1.Error.InvalidArgument: "
    cases = [
        ("CreateSchedule", {"name": "x", "cron": "0 25 * * *", "kind": "sleep",
                            "job_definition": QUICK}, "cron: "),
        ("CreateSchedule", {"name": "x", "cron": "@daily", "timezone": "Mars/Base",
                            "kind": "sleep", "job_definition": QUICK}, "timezone: "),
        ("CreateSchedule", {"name": "x", "cron": "@daily", "kind": "sleep",
                            "job_definition": QUICK, "owner": "me"}, "owner: "),
        ("ConfigureWebhook", {"url": "https://example.com/h", "events": ["job.exploded"]},
         "events[0]: "),
        ("ConfigureWebhook", {"url": "ftp://example.com/h", "events": ["job.failed"]}, "url: "),
        ("CreateBackupPolicy", {"name": "p", "provider": "vsphere",
                                "retention": {"count": -2}}, "retention.count: "),
        ("CreateBackupPolicy", {"name": "p", "provider": "vsphere",
                                "retention": {"age_days": -1}}, "retention.age_days: "),
    ]
    for method, definition, field in cases:
        assert error + field in create_error(address, method, definition), (method, field)
    refused = create_error(address, "CreateSchedule", {"name": "x", "cron": "@daily",
                                                       "kind": "sleep", "job_definition": QUICK},
                           user="hsdk-outsider")
    assert "org.freedesktop.DBus.Error.AccessDenied" in refused


async def test_webhooks_get_each_event_signed_and_never_show_secrets(system_bus,
                                                                    start_hypervisord, receiver):
    address = system_bus.address
    await asyncio.to_thread(start_hypervisord, automation=FAST_WEBHOOKS, webhooks=[
        {"url": receiver.url, "events": ["job.completed"], "secret": SECRET}])
    path = await asyncio.to_thread(create, address, "ConfigureWebhook", {
        "url": receiver.url, "events": ["job.started", "job.completed"],
        "headers": {"Authorization": "Bearer token-123", "X-Team": "ops"}})
    assert await asyncio.to_thread(live, address, path, WEBHOOK_IFACE) == \
        documented(WEBHOOK_IFACE)
    reply = await asyncio.to_thread(submit, address, QUICK, "sleep")
    job_id = json.loads(reply.stdout.split()[1]).rsplit("/", 1)[1].replace("_", "-")
    got = await receiver.wait_for(3)
    # the service records a delivery once the receiver has answered: when both of the
    # API webhook's are recorded, nothing more is under way
    log = await asyncio.to_thread(wait_for_value, lambda: deliveries(address, path), lambda log:
                                  len(log) == 2 and "pending" not in {d["state"] for d in log},
                                  what="the API webhook's two deliveries recorded")
    assert [(d["event"], d["status_code"]) for d in log] == \
        [("job.started", 200), ("job.completed", 200)]
    assert sorted(r.event for r in receiver.attempts) == \
        ["job.completed", "job.completed", "job.started"]
    signed = [r for r in got if "X-HyperSDK-Signature" in r.headers]
    assert len(signed) == 1 and signed[0].signature_ok(SECRET)
    assert signed[0].payload["job_id"] == job_id and signed[0].payload["status"] == "completed"
    from_api = [r for r in got if "Authorization" in r.headers]
    assert {r.headers["Authorization"] for r in from_api} == {"Bearer token-123"}
    objects = await asyncio.to_thread(managed_objects, address)
    text = json.dumps(objects)
    assert SECRET not in text and "token-123" not in text
    webhooks = {p: o[WEBHOOK_IFACE] for p, o in objects.items() if WEBHOOK_IFACE in o}
    assert len(webhooks) == 2
    assert webhooks[path]["Headers"]["data"] == {"Authorization": "<redacted>", "X-Team": "ops"}
    assert sorted(w["HasSecret"]["data"] for w in webhooks.values()) == [False, True]


async def test_undelivered_events_are_delivered_after_a_restart(system_bus, start_hypervisord,
                                                                receiver):
    address = system_bus.address
    settings = {"automation": FAST_WEBHOOKS,
                "webhooks": [{"url": receiver.url, "events": ["job.failed"]}]}
    daemon = await asyncio.to_thread(start_hypervisord, **settings)
    receiver.default_status = 500
    await asyncio.to_thread(submit, address, {"message": "boom"}, "fail")
    await until(lambda: len(receiver.attempts) >= 2, what="two refused attempts")
    assert receiver.received == []
    await asyncio.to_thread(daemon.stop)
    receiver.default_status = 200
    await asyncio.to_thread(start_hypervisord, **settings)
    [item] = await receiver.wait_for(1)
    assert item.event == "job.failed" and item.payload["error"] == "boom"
    assert len({r.headers["X-HyperSDK-Delivery"] for r in receiver.attempts}) == 1


def test_schedule_and_policy_export_simulator_vms_over_dbus(system_bus, start_hypervisord,
                                                            service_dir, tagged_sim):
    address = system_bus.address
    start_hypervisord(providers={"vsphere": tagged_sim.provider_settings()})
    exports = service_dir / "exports"
    schedule = create(address, "CreateSchedule", {
        "name": "sim-export", "cron": "* * * * * */3", "timezone": "UTC",
        "job_definition": {"vm_identifier": "DC0_H0_VM0", "provider": "vsphere",
                           "export_method": "disk", "export_path": "scheduled/{time}"}})
    jobs: list[str] = []
    for _ in range(2):  # fires, then fires again on a later slot
        jobs.append(wait_until(
            lambda: (j := prop(address, schedule, SCHEDULE_IFACE, "LastJob")) not in
            ("/", *jobs) and j, what="the schedule to fire"))
        wait_until(lambda: job_property(address, jobs[-1], "Status") in ("completed", "failed"),
                   what="the scheduled export")
        assert job_property(address, jobs[-1], "Status") == "completed", \
            job_property(address, jobs[-1], "Error")
    call(address, schedule, SCHEDULE_IFACE, "Delete", "a{sv}", "0")
    runs = sorted((exports / "scheduled").iterdir())
    assert len(runs) >= 2
    for run in runs[:2]:
        assert sorted(p.name for p in run.iterdir()) == ["DC0_H0_VM0-disk1.vmdk", "DC0_H0_VM0.mf"]

    policy = create(address, "CreateBackupPolicy", {
        "name": "prod", "vm_filter": {"tags": ["backup=production"]},
        "retention": {"count": 1}, "export_options": {"export_method": "disk"}})
    assert live(address, policy, POLICY_IFACE) == documented(POLICY_IFACE)
    plan = json.loads(call(address, policy, POLICY_IFACE, "DryRun", "a{sv}", "0")[0])
    assert sorted(vm["name"] for vm in plan["vms"]) == sorted(PRODUCTION)
    root = exports / "backups" / "prod"
    for _ in range(2):
        [jobs] = call(address, policy, POLICY_IFACE, "Run", "a{sv}", "0")
        assert len(jobs) == 2
        for path in jobs:
            wait_until(lambda: job_property(address, path, "Status") == "completed",
                       what=f"{path} to complete")
    wait_until(lambda: all(len(list((root / vm).iterdir())) == 1 for vm in PRODUCTION),
               what="retention to keep one backup per VM")
    assert prop(address, policy, POLICY_IFACE, "LastRun") > 0


async def test_a_firing_schedule_announces_its_new_properties(system_bus, hypervisord,
                                                              client_bus):
    address = system_bus.address
    path = await asyncio.to_thread(create, address, "CreateSchedule", {
        "name": "announce", "cron": "* * * * * */2", "kind": "sleep", "job_definition": QUICK})
    changes: list[dict] = []

    def on_message(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path == path:
            changes.append({k: v.value for k, v in msg.body[1].items()})

    client_bus.add_message_handler(on_message)
    await client_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=[f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'"]))
    fired = await until(lambda: next((c for c in changes if c.get("LastJob", "/") != "/"), None),
                        what="a PropertiesChanged with the schedule's first job")
    assert fired["LastJob"].startswith(ROOT + "/jobs/job_")
    assert fired["LastRun"] > 0 and fired["NextRun"] > fired["LastRun"]
    await asyncio.to_thread(call, address, path, SCHEDULE_IFACE, "Delete", "a{sv}", "0")


async def _watch_properties(bus, paths: list[str]) -> dict[str, list[dict]]:
    """PropertiesChanged of `paths`, collected as they arrive: {path: [changed values]}."""
    changes: dict[str, list[dict]] = {path: [] for path in paths}

    def on_message(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path in changes:
            changes[msg.path].append({k: v.value for k, v in msg.body[1].items()})

    bus.add_message_handler(on_message)
    for path in paths:
        await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'"]))
    return changes


async def _announced(changes: list[dict], wanted: dict) -> None:
    await until(lambda: any(wanted.items() <= change.items() for change in changes),
                what=f"a PropertiesChanged with {wanted}")


async def test_set_enabled_on_a_backup_policy_and_a_webhook(system_bus, start_hypervisord,
                                                            client_bus, receiver):
    address = system_bus.address
    await asyncio.to_thread(start_hypervisord, automation=FAST_WEBHOOKS, webhooks=[
        {"url": "http://127.0.0.1:9/from-config", "events": ["job.failed"]}])

    def set_enabled(path: str, interface: str, enabled: bool, user: str = MEMBER):
        return gdbus_call(address, path, f"{interface}.SetEnabled",
                          "true" if enabled else "false", "{}", user=user)

    webhook = await asyncio.to_thread(create, address, "ConfigureWebhook", {
        "url": receiver.url, "events": ["job.started", "job.completed"]})
    policy = await asyncio.to_thread(create, address, "CreateBackupPolicy", {
        "name": "every-second", "provider": "ova", "schedule": "* * * * * */1",
        "timezone": "UTC", "enabled": False})
    for path, interface in ((webhook, WEBHOOK_IFACE), (policy, POLICY_IFACE)):
        assert await asyncio.to_thread(live, address, path, interface) == \
            documented(interface)
    changes = await _watch_properties(client_bus, [webhook, policy])

    async def prop_of(path: str, interface: str, name: str):
        return await asyncio.to_thread(prop, address, path, interface, name)

    async def run_sleep_job() -> str:
        reply = await asyncio.to_thread(submit, address, QUICK, "sleep")
        path = json.loads(reply.stdout.split()[1])
        await asyncio.to_thread(wait_until, lambda: job_property(address, path, "Status") ==
                                "completed", what="the job")
        return path.rsplit("/", 1)[1].replace("_", "-")

    # a disabled webhook's receiver gets nothing; enabled again, it gets the next events
    assert set_enabled(webhook, WEBHOOK_IFACE, False).returncode == 0
    assert await prop_of(webhook, WEBHOOK_IFACE, "Enabled") is False
    await _announced(changes[webhook], {"Enabled": False})
    await run_sleep_job()
    assert receiver.attempts == []  # and the next wait shows none came late either
    assert set_enabled(webhook, WEBHOOK_IFACE, True).returncode == 0
    await _announced(changes[webhook], {"Enabled": True})
    second = await run_sleep_job()
    got = await receiver.wait_for(2)
    assert {r.payload["job_id"] for r in got} == {second}

    # a disabled policy is not run by its schedule; enabled, it is; Run works either way
    # (that a disabled policy lets its slots pass: test_backup_policies.py, on a fake clock)
    assert await prop_of(policy, POLICY_IFACE, "NextRun") == 0
    assert await prop_of(policy, POLICY_IFACE, "LastRun") == 0
    assert set_enabled(policy, POLICY_IFACE, True).returncode == 0
    await _announced(changes[policy], {"Enabled": True})
    assert next(c for c in changes[policy] if c.get("Enabled"))["NextRun"] > 0
    await asyncio.to_thread(wait_until, lambda: prop(address, policy, POLICY_IFACE, "LastRun"),
                            what="a scheduled run")
    assert set_enabled(policy, POLICY_IFACE, False).returncode == 0
    await _announced(changes[policy], {"Enabled": False, "NextRun": 0})
    settled = await prop_of(policy, POLICY_IFACE, "LastRun")
    assert await asyncio.to_thread(call, address, policy, POLICY_IFACE, "Run", "a{sv}", "0") \
        == [[]]  # no OVA files: a run of nothing, but a run
    assert await prop_of(policy, POLICY_IFACE, "LastRun") > settled

    # a config-file webhook is enabled in the config only; outsiders are refused
    [from_config] = [p for p, o in (await asyncio.to_thread(managed_objects, address)).items()
                     if o.get(WEBHOOK_IFACE, {}).get("Source", {}).get("data") == "config"]
    refused = set_enabled(from_config, WEBHOOK_IFACE, False)
    assert "org.hypersdk.HyperSDK1.Error.InvalidArgument: enabled: " in refused.stderr
    for path, interface in ((webhook, WEBHOOK_IFACE), (policy, POLICY_IFACE)):
        refused = set_enabled(path, interface, False, user="hsdk-outsider")
        assert "org.freedesktop.DBus.Error.AccessDenied" in refused.stderr, refused.stderr
    assert await prop_of(webhook, WEBHOOK_IFACE, "Enabled") is True
