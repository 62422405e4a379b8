"""Webhooks: validation, redaction, private targets, and delivery to a real HTTP receiver
on 127.0.0.1 (named in automation.webhook_private_targets, as it must be)."""
from __future__ import annotations

import asyncio
import json

import pytest

from hypersdk.service.automation import Automation
from hypersdk.service.errors import InvalidArgument
from hypersdk.service.redact import redact_headers, redact_url
from hypersdk.service.webhook_targets import TargetPolicy
from hypersdk.service.webhooks import Webhooks, validate_webhook

from ..support.wait import until
from .conftest import FakeClock, make_config, start_engine, stop_engine

SECRET = "s3cret-hmac-key"
QUICK = {"steps": 1, "interval": 0.01, "step_bytes": 1}


async def pending_deliveries(store) -> int:
    """Webhook events not yet delivered (or given up on): the outbox's own record."""
    query = "SELECT count(*) FROM webhook_outbox WHERE state='pending'"
    return (await store.execute(query)).fetchone()[0]


async def outbox_drained(store) -> bool:
    return await pending_deliveries(store) == 0


def local_config(tmp_path, automation: dict | None = None, **sections):
    """make_config with the receivers' address, 127.0.0.1, allowed as a private target."""
    return make_config(tmp_path, automation={"webhook_private_targets": ["127.0.0.1"],
                                             **(automation or {})}, **sections)


@pytest.mark.parametrize("definition, field", [
    ({"url": "ftp://example.com/x", "events": ["job.failed"]}, "url"),
    ({"url": "file:///etc/passwd", "events": ["job.failed"]}, "url"),
    ({"url": "http://", "events": ["job.failed"]}, "url"),
    ({"url": "https://example.com/x", "events": ["job.exploded"]}, "events[0]"),
    ({"url": "https://example.com/x", "events": []}, "events"),
    ({"url": "https://example.com/x", "events": ["job.failed"], "headers": {"A": 1}},
     "headers.A"),
    ({"url": "https://example.com/x", "events": ["job.failed"],
      "headers": {"X-HyperSDK-Signature": "x"}}, "headers.X-HyperSDK-Signature"),
    ({"url": "https://example.com/x", "events": ["job.failed"], "retries": 3}, "retries"),
])
def test_bad_webhooks_are_refused_naming_the_field(definition, field):
    with pytest.raises(InvalidArgument) as info:
        validate_webhook(definition, TargetPolicy([]))
    assert info.value.field == field


def test_secret_looking_values_are_redacted():
    headers = {"Authorization": "Bearer token123", "X-Api-Key": "k", "X-Team": "ops",
               "X-Note": "Basic dXNlcjpwYXNz"}
    assert redact_headers(headers) == {"Authorization": "<redacted>", "X-Api-Key": "<redacted>",
                                       "X-Team": "ops", "X-Note": "<redacted>"}
    shown = redact_url("https://bob:hunter2@hooks.example.com/x?token=abc&team=ops")
    assert "hunter2" not in shown and "abc" not in shown and "team=ops" in shown


async def _automation(config):
    env = await start_engine(config)
    automation = Automation(env.store, env.engine, config, backup_kind="fake_export")
    await automation.load()
    await automation.start()
    return env, automation


async def _deliveries_of(webhooks: Webhooks, webhook_id: str, count: int) -> list[dict]:
    """The delivery log once it has `count` entries (the receiver answers before it is written)."""
    async def settled() -> list[dict] | None:
        log = await webhooks.deliveries(webhook_id)
        return log if len(log) >= count and log[-1]["state"] != "pending" else None
    return await until(settled, what=f"{count} deliveries in the log")


async def _deliveries(automation, webhook_id: str, count: int) -> list[dict]:
    return await _deliveries_of(automation.webhooks, webhook_id, count)


async def _close(env, automation):
    await automation.stop()
    await stop_engine(env)


async def test_each_job_event_arrives_once_with_a_valid_signature(tmp_path, receiver,
                                                                  database_url):
    env, automation = await _automation(local_config(tmp_path, database={"url": database_url}))
    try:
        hook = await automation.webhooks.create(
            {"url": receiver.url, "events": ["job.started", "job.completed", "job.failed"],
             "headers": {"Authorization": "Bearer token123"}, "secret": SECRET}, 0)
        done = await env.engine.submit("sleep", QUICK)
        failed = await env.engine.submit("fail", {"message": "disk on fire"})
        await env.wait_job(done.id)
        await env.wait_job(failed.id)
        got = await receiver.wait_for(4)
        await until(lambda: outbox_drained(env.store), what="the outbox to drain")
        assert len(receiver.attempts) == 4  # and nothing more
        by_key = {(r.event, r.payload["job_id"]): r for r in got}
        assert set(by_key) == {("job.started", done.id), ("job.completed", done.id),
                               ("job.started", failed.id), ("job.failed", failed.id)}
        for item in got:
            assert item.signature_ok(SECRET)
            assert item.headers["Authorization"] == "Bearer token123"
            assert item.headers["Content-Type"] == "application/json"
        failure = by_key[("job.failed", failed.id)].payload
        assert failure["status"] == "failed" and failure["error"] == "disk on fire"
        assert set(failure) >= {"event", "time", "job_id", "status", "vm", "error"}
        public = json.dumps(hook.public())
        assert SECRET not in public and "token123" not in public
        log = await _deliveries(automation, hook.id, 4)
        assert len(log) == 4 and {d["state"] for d in log} == {"delivered"}
    finally:
        await _close(env, automation)


async def test_500_three_times_then_200_is_delivered_after_backoff(tmp_path, receiver):
    """The retries follow the backoff on the automation's clock (retry_base 0.2 s, doubling):
    each failed attempt sets the next one exactly that far ahead, and it is made only once
    the clock gets there."""
    clock = FakeClock(1_800_000_000.0)
    env = await start_engine(local_config(tmp_path))
    automation = Automation(env.store, env.engine, env.config, clock=clock,
                            backup_kind="fake_export")
    await automation.load()
    await automation.start()
    try:
        hook = await automation.webhooks.create({"url": receiver.url, "events": ["job.completed"],
                                                 "secret": SECRET}, 0)
        receiver.answers = [500, 500, 500]
        job = await env.engine.submit("sleep", QUICK)
        await env.wait_job(job.id)
        for attempt, backoff in enumerate([0.2, 0.4, 0.8], 1):
            row = await until(lambda: _outbox_after(env.store, attempt), what=f"attempt {attempt}")
            assert row["next_attempt"] == clock.now() + backoff
            assert len(receiver.attempts) == attempt  # the next waits for the clock
            clock.advance(backoff)
        [item] = await receiver.wait_for(1, timeout=15)
        assert item.payload["job_id"] == job.id and item.signature_ok(SECRET)
        assert len(receiver.attempts) == 4
        assert len({a.headers["X-HyperSDK-Delivery"] for a in receiver.attempts}) == 1
        log = await _deliveries(automation, hook.id, 4)
        assert [d["status_code"] for d in log] == [500, 500, 500, 200]
        assert [d["attempt"] for d in log] == [1, 2, 3, 4]
        assert log[0]["error"] == "HTTP 500" and log[-1]["state"] == "delivered"
    finally:
        await _close(env, automation)


async def _outbox_after(store, attempts: int):
    """The one outbox entry once it has recorded `attempts` attempts."""
    row = (await store.execute("SELECT attempts, next_attempt FROM webhook_outbox")).fetchone()
    return row if row is not None and row["attempts"] == attempts else None


async def test_gives_up_after_max_attempts_and_logs_unreachable_receivers(tmp_path, receiver):
    config = local_config(tmp_path, automation={"webhook_max_attempts": 2,
                                                "webhook_retry_base": 0.05})
    env, automation = await _automation(config)
    try:
        dead = await automation.webhooks.create({"url": "http://127.0.0.1:9/nothing",
                                                 "events": ["job.completed"]}, 0)
        job = await env.engine.submit("sleep", QUICK)
        await env.wait_job(job.id)
        log = await _deliveries(automation, dead.id, 2)
        assert [d["attempt"] for d in log] == [1, 2] and log[-1]["state"] == "failed"
        assert log[0]["status_code"] == 0 and log[0]["error"].startswith("cannot connect")
    finally:
        await _close(env, automation)


async def test_undelivered_events_are_delivered_after_a_restart(tmp_path, receiver,
                                                                database_url):
    config = local_config(tmp_path, automation={"webhook_retry_base": 0.1},
                          database={"url": database_url},
                          webhooks=[{"url": receiver.url, "events": ["job.completed"]}])
    env, automation = await _automation(config)
    receiver.default_status = 503  # the receiver is down
    job = await env.engine.submit("sleep", QUICK)
    await env.wait_job(job.id)
    await until(lambda: receiver.attempts, what="a refused attempt")
    await _close(env, automation)
    assert receiver.received == []
    receiver.default_status = 200
    env, automation = await _automation(config)  # same database, same config webhook id
    try:
        [item] = await receiver.wait_for(1)
        assert item.payload["job_id"] == job.id
        [hook] = await automation.webhooks.list()
        assert hook.source == "config"
    finally:
        await _close(env, automation)


async def test_test_event_and_config_webhooks_cannot_be_deleted_over_the_api(tmp_path, receiver):
    config = local_config(tmp_path, webhooks=[{"url": receiver.url, "events": ["job.failed"]}])
    env, automation = await _automation(config)
    try:
        [hook] = await automation.webhooks.list()
        await automation.webhooks.test(hook.id)
        [item] = await receiver.wait_for(1)
        assert item.event == "webhook.test"
        with pytest.raises(InvalidArgument, match="config file"):
            await automation.webhooks.delete(hook.id)
    finally:
        await _close(env, automation)


async def test_finished_events_are_pruned_after_a_week(tmp_path, receiver, database_url):
    env = await start_engine(local_config(tmp_path, database={"url": database_url}))
    clock = FakeClock(1_800_000_000.0)
    webhooks = Webhooks(env.store, env.config.automation, clock)
    deliverer = asyncio.create_task(webhooks.run())
    try:
        hook = await webhooks.create({"url": receiver.url, "events": ["job.failed"]}, 0)
        await webhooks.test(hook.id)
        await receiver.wait_for(1)
        await _deliveries_of(webhooks, hook.id, 1)
        await webhooks._enqueue(hook.id, "job.failed", {"job_id": "job-pending"})
        receiver.default_status = 500  # this one stays pending: never pruned
        clock.advance(6 * 86400)
        assert await webhooks.prune() == 0
        clock.advance(2 * 86400)
        assert await webhooks.prune() == 1
        assert [tuple(r) for r in await env.store.execute("SELECT event, state FROM webhook_outbox")] \
            == [("job.failed", "pending")]
        assert all(d["event"] == "job.failed" for d in await webhooks.deliveries(hook.id))
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)
        await stop_engine(env)


async def test_schedule_and_retention_events_reach_the_receiver(tmp_path, receiver):
    env, automation = await _automation(local_config(tmp_path))
    try:
        await automation.webhooks.create({"url": receiver.url, "events": [
            "schedule.triggered", "backup.retention_applied"], "secret": SECRET}, 0)
        schedule = await automation.schedules.create({
            "name": "hourly", "cron": "@hourly", "kind": "sleep", "job_definition": QUICK}, 0)
        job = await automation.schedules.run_now(schedule.id, 0)
        [triggered] = await receiver.wait_for(1, event="schedule.triggered")
        assert triggered.payload["schedule_id"] == schedule.id
        assert triggered.payload["job_id"] == job.id and triggered.signature_ok(SECRET)
        policy = await automation.policies.create({"name": "nightly", "provider": "vsphere",
                                                   "retention": {"count": 2}}, 0)
        await automation.policies.apply_retention(policy.id, "run-1")
        [applied] = await receiver.wait_for(1, event="backup.retention_applied")
        assert applied.payload["policy_id"] == policy.id and applied.payload["deleted"] == []
    finally:
        await _close(env, automation)


async def test_a_disabled_webhook_gets_no_events_and_holds_queued_ones(tmp_path, receiver):
    env, automation = await _automation(local_config(tmp_path))
    webhooks = automation.webhooks
    changed: list[tuple[str, str]] = []
    automation.on_change.append(lambda collection, item: changed.append((collection, item)))
    try:
        hook = await webhooks.create({"url": receiver.url, "events": ["job.failed"]}, 0)
        assert (await webhooks.set_enabled(hook.id, False)).enabled is False
        assert changed == [("webhook", hook.id)]
        # an event queued before the webhook was disabled, still undelivered
        await webhooks._enqueue(hook.id, "job.failed", {"job_id": "queued-before"})
        job = await env.engine.submit("fail", {"message": "boom"}, 0)
        assert await env.wait_job(job.id) == "failed"
        with pytest.raises(InvalidArgument, match="webhook: .* is disabled"):
            await webhooks.test(hook.id)
        assert await webhooks.due() == []  # what the delivery loop sends: nothing for a disabled hook
        assert receiver.attempts == []
        assert [tuple(r) for r in await env.store.execute("SELECT state FROM webhook_outbox")] == \
            [("pending",)]
        await webhooks.set_enabled(hook.id, True)
        [item] = await receiver.wait_for(1)
        assert item.payload["job_id"] == "queued-before"
        await until(lambda: outbox_drained(env.store), what="the outbox to drain")
        assert len(receiver.attempts) == 1
    finally:
        await _close(env, automation)


async def test_config_webhooks_are_enabled_or_disabled_in_the_config_only(tmp_path, receiver):
    config = local_config(tmp_path, webhooks=[{"url": receiver.url, "events": ["job.failed"]}])
    env, automation = await _automation(config)
    try:
        [hook] = await automation.webhooks.list()
        with pytest.raises(InvalidArgument, match="enabled: .* config file"):
            await automation.webhooks.set_enabled(hook.id, False)
        assert (await automation.webhooks.get(hook.id)).enabled
    finally:
        await _close(env, automation)


# -- private targets ------------------------------------------------------------------
@pytest.mark.parametrize("url, shown", [
    ("http://127.0.0.1:8080/hook", "127.0.0.1 (loopback)"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (link-local)"),
    ("https://10.1.2.3/hook", "10.1.2.3 (private)"),
    ("http://[::1]:8080/hook", "::1 (loopback)"),
    ("http://[::ffff:127.0.0.1]/hook", "(loopback)"),
    ("http://127.1/hook", "127.0.0.1 (loopback)"),  # shorthands the resolver reads
    ("http://2130706433/hook", "127.0.0.1 (loopback)"),
    ("http://0.0.0.0/hook", "0.0.0.0 ("),
])
def test_private_addresses_are_refused_when_configured(url, shown):
    with pytest.raises(InvalidArgument) as info:
        validate_webhook({"url": url, "events": ["job.failed"]}, TargetPolicy([]))
    assert info.value.field == "url"
    assert shown in info.value.rule and "not a public address" in info.value.rule
    assert "automation.webhook_private_targets" in info.value.rule


def test_the_allowlist_names_hosts_or_exact_ports():
    policy = TargetPolicy(["127.0.0.1:8080", "10.1.2.3", "[::1]:9000"])
    definition = {"events": ["job.failed"]}
    for allowed in ("http://127.0.0.1:8080/x", "https://10.1.2.3/x", "http://10.1.2.3:81/x",
                    "http://[::1]:9000/x", "https://hooks.example.com/x"):
        validate_webhook({**definition, "url": allowed}, policy)
    for refused in ("http://127.0.0.1:8081/x", "http://127.0.0.1/x", "http://[::1]/x",
                    "http://169.254.169.254/x"):
        with pytest.raises(InvalidArgument):
            validate_webhook({**definition, "url": refused}, policy)


def test_a_malformed_allowlist_entry_is_a_config_error(tmp_path):
    from hypersdk.service.config import ConfigError
    with pytest.raises(ConfigError, match="automation.webhook_private_targets: expected a list "
                                          "of host or host:port"):
        make_config(tmp_path, automation={"webhook_private_targets": ["http://10.0.0.1/"]})


async def _one_delivery(tmp_path, url: str, targets: list[str]) -> dict:
    """Create a webhook to `url` and send its test event; the delivery log's entry."""
    env = await start_engine(make_config(tmp_path, automation={
        "webhook_private_targets": targets, "webhook_max_attempts": 1}))
    webhooks = Webhooks(env.store, env.config.automation, FakeClock(1_800_000_000.0))
    deliverer = asyncio.create_task(webhooks.run())
    try:
        hook = await webhooks.create({"url": url, "events": ["job.failed"]}, 0)
        await webhooks.test(hook.id)
        [entry] = await _deliveries_of(webhooks, hook.id, 1)
        return entry
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)
        await stop_engine(env)


async def test_a_name_resolving_to_loopback_is_refused_at_delivery(tmp_path, receiver):
    """A name passes the configure-time check; what it resolves to is checked before the
    connection, which goes only to the checked address (DNS rebinding gains nothing)."""
    port = receiver.url.split(":")[2].split("/")[0]
    entry = await _one_delivery(tmp_path, f"http://localhost:{port}/hook", [])
    assert entry["state"] == "failed" and entry["status_code"] == 0
    assert entry["error"].startswith("refused: localhost resolves to 127.0.0.1 (loopback)")
    assert f"name localhost:{port} in automation.webhook_private_targets" in entry["error"]
    assert receiver.attempts == []


async def test_a_named_private_target_is_delivered(tmp_path, receiver):
    port = receiver.url.split(":")[2].split("/")[0]
    entry = await _one_delivery(tmp_path, f"http://localhost:{port}/hook", [f"localhost:{port}"])
    assert entry["state"] == "delivered" and len(receiver.received) == 1


async def test_an_address_allowed_once_is_refused_at_delivery_once_unlisted(tmp_path, receiver):
    """The delivery checks the URL's address again: the allowlist is the config's now."""
    allowed = local_config(tmp_path)
    env = await start_engine(allowed)
    hook = await Webhooks(env.store, allowed.automation, FakeClock(0)).create(
        {"url": receiver.url, "events": ["job.failed"]}, 0)
    await stop_engine(env)
    unlisted = make_config(tmp_path, automation={"webhook_max_attempts": 1})
    env = await start_engine(unlisted)
    webhooks = Webhooks(env.store, unlisted.automation, FakeClock(1_800_000_000.0))
    deliverer = asyncio.create_task(webhooks.run())
    try:
        await webhooks.test(hook.id)
        [entry] = await _deliveries_of(webhooks, hook.id, 1)
        assert entry["error"].startswith("refused: 127.0.0.1 (loopback), not a public address")
        assert receiver.attempts == []
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)
        await stop_engine(env)


async def test_redirects_are_not_followed(tmp_path, receiver):
    receiver.answers = [302]  # wherever it points, hypervisord does not go
    entry = await _one_delivery(tmp_path, receiver.url, ["127.0.0.1"])
    assert entry["status_code"] == 302 and entry["error"] == "HTTP 302 (redirects are not followed)"
    assert len(receiver.attempts) == 1


@pytest.mark.parametrize("url, secret", [
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
     "XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("https://discord.com/api/webhooks/1234567890/AbCdEfGh1234567890_-xyzXYZ", "AbCdEfGh1234"),
    ("https://fn.azurewebsites.net/api/hook?code=AzureFunctionKey==&clientId=default",
     "AzureFunctionKey"),
    ("https://acct.blob.core.windows.net/c/disk.vhd?sv=2022&sig=SasSignature%3D", "SasSignature"),
    ("https://hooks.example.com/x?access_token=abc123", "abc123"),
])
def test_secrets_in_urls_are_redacted(url, secret):
    shown = redact_url(url)
    assert secret not in shown and "<redacted>" in shown
    assert shown.split("/")[2] == url.split("/")[2]  # the host stays readable


def test_plain_words_and_file_names_stay_readable():
    url = "https://monitoring.example.com/hypersdk-events/disk-0.vmdk?team=ops&page=2"
    assert redact_url(url) == url
