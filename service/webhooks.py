"""Webhooks: events POSTed as JSON from a persisted outbox, with retries and a delivery log.

- Events: job.started, job.completed, job.failed, job.cancelled, schedule.triggered,
  backup.retention_applied (and webhook.test, sent only by Webhook.Test). The body is
  a JSON object {event, time, job_id, status, vm, error, ...}.
- Enqueueing is one INSERT per subscribed webhook on the event loop; the delivery
  runs in its own tasks, so a slow or dead receiver never holds up a job.
- Each POST carries the configured headers, `X-HyperSDK-Event`, `X-HyperSDK-Delivery`
  (the outbox id; the same on every attempt, so receivers can drop duplicates) and,
  when a secret is set, `X-HyperSDK-Signature: sha256=<hex HMAC-SHA256 of the body>`.
- A 2xx answer within `automation.webhook_timeout` is a delivery. Anything else is
  retried after `webhook_retry_base` seconds, doubling each time, up to
  `webhook_max_attempts` attempts; then the event is marked failed. The outbox is in
  the store, so pending events are delivered after a restart (at least once: an
  attempt cut short by a crash is made again). Events may arrive out of order.
- Targets: public addresses only, unless `automation.webhook_private_targets` names
  the host (webhook_targets.py); checked when a webhook is configured and again at
  each delivery, where a refusal is a failed attempt logged as "refused: <why>".
  Redirects are not followed.
- Secrets: the `secret` is stored (the database is root-only, mode 0600) but never
  returned; header values that look like credentials and passwords or tokens in the
  URL are redacted wherever a webhook is shown. Errors in the delivery log are written
  here, never copied from exceptions (which may quote the URL).
- Disabled webhooks get no new events (Test is refused too). Events queued before
  disabling are held, neither attempted nor pruned, and delivered once the webhook is
  enabled again (an attempt already under way finishes). A config-file webhook's
  `enabled` is set in the config only.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp

from . import __version__
from .config import WEBHOOK_EVENTS
from .errors import InvalidArgument, NotFound
from .definitions import JsonObject, new_id
from .redact import redact_headers, redact_url
from .cron import Clock, wait_until
from .webhook_targets import PublicOnlyResolver, RefusedTarget, TargetPolicy

if TYPE_CHECKING:
    from .engine import JobEvent
    from .store import Store

log = logging.getLogger(__name__)

WEBHOOK_FIELDS = ("url", "events", "headers", "secret", "enabled")
TEST_EVENT = "webhook.test"
SIGNATURE_HEADER = "X-HyperSDK-Signature"
RESERVED_HEADERS = ("content-type", "content-length", "host", "x-hypersdk-signature",
                    "x-hypersdk-event", "x-hypersdk-delivery")
MAX_BACKOFF = 3600.0
CONCURRENT_DELIVERIES = 4
CLAIM_MARGIN = 30.0  # seconds past a delivery's timeout before another instance retries it
KEEP_FINISHED = 7 * 86400.0  # delivered and failed events stay in the delivery log this long
PRUNE_EVERY = 3600.0
JOB_EVENTS = {"running": "job.started", "completed": "job.completed", "failed": "job.failed",
              "cancelled": "job.cancelled"}
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")


# -- validation ------------------------------------------------------------------------
def validate_webhook(definition: Any, targets: TargetPolicy) -> dict:
    """A normalised webhook {url, events, headers, secret, enabled} or InvalidArgument."""
    fields = JsonObject(definition, WEBHOOK_FIELDS)
    url = fields.text("url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument("url", "must be an http:// or https:// URL with a host")
    try:
        parts.port
    except ValueError:
        raise InvalidArgument("url", "has an invalid port") from None
    if reason := targets.url_refusal(url):
        raise InvalidArgument("url", f"webhooks go to public addresses only: {reason}")
    events = fields.texts("events", choices=WEBHOOK_EVENTS, non_empty=True)
    headers = fields.text_map("headers", {})
    for name, value in headers.items():
        if not _HEADER_NAME_RE.match(name):
            raise InvalidArgument(f"headers.{name}", "is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise InvalidArgument(f"headers.{name}", "is set by hypervisord and cannot be "
                                                      "configured")
        if "\r" in value or "\n" in value:
            raise InvalidArgument(f"headers.{name}", "must be a single-line string")
    return {"url": url, "events": list(dict.fromkeys(events)), "headers": dict(headers),
            "secret": fields.text("secret", ""), "enabled": fields.flag("enabled", True)}


def _answer_error(status: int) -> str:
    if 200 <= status < 300:
        return ""
    if 300 <= status < 400:
        return f"HTTP {status} (redirects are not followed)"
    return f"HTTP {status}"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def iso_time(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Webhook:
    id: str
    url: str
    events: list[str]
    headers: dict[str, str]
    secret: str
    enabled: bool
    source: str  # api | config
    created_at: float

    def public(self) -> dict:
        """What may be shown to anyone: no secret, redacted headers and URL."""
        return {"id": self.id, "url": redact_url(self.url), "events": self.events,
                "headers": redact_headers(self.headers), "has_secret": bool(self.secret),
                "enabled": self.enabled, "source": self.source}


def _row_to_webhook(row) -> Webhook:
    return Webhook(id=row["id"], url=row["url"], events=json.loads(row["events"]),
                   headers=json.loads(row["headers"]), secret=row["secret"],
                   enabled=bool(row["enabled"]), source=row["source"],
                   created_at=row["created_at"])


class Webhooks:
    def __init__(self, store: "Store", settings, clock: Clock,
                 changed: Callable[[str], None] = lambda webhook_id: None) -> None:
        """`settings` is the config's `automation` section; `changed(id)` hears that a
        webhook's properties changed."""
        self.store = store
        self._changed = changed
        self.timeout = settings.webhook_timeout
        self.max_attempts = settings.webhook_max_attempts
        self.retry_base = settings.webhook_retry_base
        self.targets = TargetPolicy(settings.webhook_private_targets)
        self.clock = clock
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._tasks: set[asyncio.Task] = set()

    # -- CRUD --------------------------------------------------------------------------
    async def create(self, definition: Any, uid: int) -> Webhook:
        data = validate_webhook(definition, self.targets)
        webhook_id = new_id("webhook")
        await self._insert(webhook_id, data, "api", uid)
        log.info("webhook %s created for %s (%s)", webhook_id, redact_url(data["url"]),
                 ", ".join(data["events"]))
        return await self.get(webhook_id)

    async def _insert(self, webhook_id: str, data: dict, source: str, uid: int) -> None:
        await self.store.execute(
            "INSERT INTO webhooks (id, url, events, headers, secret, enabled, source,"
            " created_by_uid, created_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE"
            " SET url=excluded.url, events=excluded.events, headers=excluded.headers,"
            " secret=excluded.secret, enabled=excluded.enabled",
            (webhook_id, data["url"], json.dumps(data["events"]), json.dumps(data["headers"]),
             data["secret"], int(data["enabled"]), source, uid, self.clock.now()))

    async def load_config(self, webhooks: list[dict]) -> None:
        """Make the config file's webhooks current; ids are stable across restarts."""
        ids = []
        for index, item in enumerate(webhooks):
            try:
                data = validate_webhook(item, self.targets)
            except InvalidArgument as exc:
                raise InvalidArgument(f"config: webhooks[{index}].{exc.field}", exc.rule) from None
            digest = hashlib.sha256(f"{item['url']}#{index}".encode()).hexdigest()
            webhook_id = "webhook-c" + digest[:11]
            await self._insert(webhook_id, data, "config", 0)
            ids.append(webhook_id)
        kept = f" AND id NOT IN ({','.join('?' * len(ids))})" if ids else ""  # () is SQLite's only
        await self.store.execute(f"DELETE FROM webhooks WHERE source='config'{kept}", ids)

    async def get(self, webhook_id: str) -> Webhook:
        row = (await self.store.execute("SELECT * FROM webhooks WHERE id=?",
                                        (webhook_id,))).fetchone()
        if row is None:
            raise NotFound(f"no webhook {webhook_id!r}")
        return _row_to_webhook(row)

    async def list(self) -> list[Webhook]:
        return [_row_to_webhook(r) for r in
                await self.store.execute("SELECT * FROM webhooks ORDER BY created_at, id")]

    async def set_enabled(self, webhook_id: str, enabled: bool) -> Webhook:
        webhook = await self.get(webhook_id)
        if webhook.source == "config":
            raise InvalidArgument("enabled", f"{webhook_id} comes from the config file; "
                                  "set its enabled there")
        if webhook.enabled != enabled:
            await self.store.execute("UPDATE webhooks SET enabled=? WHERE id=?",
                                     (int(enabled), webhook_id))
            log.info("webhook %s %s", webhook_id, "enabled" if enabled else "disabled")
            self._changed(webhook_id)
            self._wake.set()  # held events may be due now
        return await self.get(webhook_id)

    async def delete(self, webhook_id: str) -> None:
        if (await self.get(webhook_id)).source == "config":
            raise InvalidArgument("webhook", f"{webhook_id} comes from the config file; "
                                  "remove it there")
        await self.store.execute("DELETE FROM webhooks WHERE id=?", (webhook_id,))

    async def deliveries(self, webhook_id: str, limit: int = 100) -> list[dict]:
        await self.get(webhook_id)
        rows = await self.store.execute(
            "SELECT d.*, o.state FROM webhook_deliveries d JOIN webhook_outbox o"
            " ON o.id = d.outbox_id WHERE d.webhook_id=? ORDER BY d.id DESC LIMIT ?",
            (webhook_id, limit))
        return [{"id": r["id"], "delivery": r["outbox_id"], "event": r["event"],
                 "time": iso_time(r["time"]), "attempt": r["attempt"],
                 "status_code": r["status_code"], "error": r["error"],
                 "duration_ms": round(r["duration"] * 1000, 1), "state": r["state"]}
                for r in rows][::-1]

    # -- enqueueing --------------------------------------------------------------------
    async def emit(self, event: str, payload: dict) -> int:
        """Queue `event` for every enabled webhook that wants it; returns how many."""
        targets = [w.id for w in await self.list() if w.enabled and event in w.events]
        for webhook_id in targets:
            await self._enqueue(webhook_id, event, payload)
        return len(targets)

    async def test(self, webhook_id: str) -> None:
        if not (await self.get(webhook_id)).enabled:
            raise InvalidArgument("webhook", f"{webhook_id} is disabled; enable it to test it")
        await self._enqueue(webhook_id, TEST_EVENT, {"message": "test event from hypervisord"})

    async def _enqueue(self, webhook_id: str, event: str, payload: dict) -> None:
        now = self.clock.now()
        body = json.dumps({"event": event, "time": iso_time(now), **payload}, sort_keys=True)
        await self.store.execute("INSERT INTO webhook_outbox (webhook_id, event, body, created_at,"
                                 " next_attempt, state) VALUES (?,?,?,?,?, 'pending')",
                                 (webhook_id, event, body, now, now))
        self._wake.set()

    def on_job_event(self, event: "JobEvent") -> Awaitable[int] | None:
        """Engine listener: enqueue only (in a task of its own: JobEngine.notify)."""
        if not event.local:
            return None  # the instance that changed the job queues its event (fleet.py)
        name = JOB_EVENTS.get(event.job.status) if event.type == "status" else None
        if name is None:
            return None
        job = event.job
        return self.emit(name, {"job_id": job.id, "kind": job.kind, "status": job.status,
                                "vm": job.vm, "provider": job.provider, "error": job.error})

    async def prune(self) -> int:
        """Forget delivered and failed events older than KEEP_FINISHED; returns how many."""
        cutoff = self.clock.now() - KEEP_FINISHED
        finished = "FROM webhook_outbox WHERE state != 'pending' AND created_at < ?"
        async with self.store.transaction() as db:
            await db.execute("DELETE FROM webhook_deliveries WHERE outbox_id IN"
                             f" (SELECT id {finished})", (cutoff,))
            return (await db.execute(f"DELETE {finished}", (cutoff,))).rowcount

    # -- delivery ----------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver due events until cancelled."""
        limit = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        headers = {"User-Agent": f"hypersdk/{__version__}"}
        pruned_at = float("-inf")
        connector = aiohttp.TCPConnector(resolver=PublicOnlyResolver(self.targets))
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            try:
                while True:
                    if time.monotonic() - pruned_at >= PRUNE_EVERY:
                        await self.prune()
                        pruned_at = time.monotonic()
                    for row in await self.due():
                        hold = await self._claim(row)
                        if hold is None:
                            continue  # another instance delivers it
                        self._in_flight.add(row["id"])
                        task = asyncio.create_task(self._deliver(session, limit, row, hold))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    await wait_until(self.clock, await self._next_due(), self._wake)
            finally:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def due(self) -> list:
        """The outbox rows to deliver now: pending, due, of an enabled webhook, not in flight."""
        rows = (await self.store.execute(
            "SELECT o.*, w.url, w.headers, w.secret FROM webhook_outbox o JOIN webhooks w"
            " ON w.id = o.webhook_id WHERE o.state='pending' AND w.enabled=1"
            " AND o.next_attempt<=? ORDER BY o.id", (self.clock.now(),))).fetchall()
        return [r for r in rows if r["id"] not in self._in_flight]

    async def _claim(self, row) -> float | None:
        """Take the event for this delivery attempt, once across the instances sharing
        the store: its next attempt moves past this one's timeout (should this instance
        die meanwhile, another delivers it then). The time it is held to, or None when
        another instance took it."""
        hold = self.clock.now() + self.timeout + CLAIM_MARGIN
        return await self._move_attempt(row["id"], row["next_attempt"], hold)

    async def _move_attempt(self, outbox_id: int, when: float, to: float) -> float | None:
        taken = (await self.store.execute(
            "UPDATE webhook_outbox SET next_attempt=? WHERE id=? AND state='pending' AND"
            " next_attempt=?", (to, outbox_id, when))).rowcount
        return to if taken else None

    async def _next_due(self) -> float | None:
        rows = (await self.store.execute(
            "SELECT o.id, o.next_attempt FROM webhook_outbox o JOIN webhooks w"
            " ON w.id = o.webhook_id WHERE o.state='pending' AND w.enabled=1"
            " ORDER BY o.next_attempt")).fetchall()
        return next((r[1] for r in rows if r[0] not in self._in_flight), None)

    async def _deliver(self, session: aiohttp.ClientSession, limit: asyncio.Semaphore,
                       row, hold: float) -> None:
        body = row["body"].encode()
        headers = {**json.loads(row["headers"]), "Content-Type": "application/json",
                   "X-HyperSDK-Event": row["event"], "X-HyperSDK-Delivery": str(row["id"])}
        if row["secret"]:
            headers[SIGNATURE_HEADER] = sign(row["secret"], body)
        try:
            async with limit:
                started = time.monotonic()
                status, error = await self._post(session, row["url"], body, headers)
                await self._record(row, status, error, time.monotonic() - started)
        except asyncio.CancelledError:
            # a clean stop mid-attempt gives the claim back: the next start (or another
            # instance) delivers the event at once, not after the claim's timeout
            await self._move_attempt(row["id"], hold, row["next_attempt"])
            raise
        finally:
            self._in_flight.discard(row["id"])
            self._wake.set()

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes,
                    headers: dict) -> tuple[int, str]:
        """POST once; redirects are not followed (they could lead to a private address)."""
        if reason := self.targets.url_refusal(url):
            return 0, f"refused: {reason}"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout,
                                    allow_redirects=False) as response:
                await response.read()
                return response.status, _answer_error(response.status)
        except RefusedTarget as exc:
            return 0, str(exc)
        except asyncio.TimeoutError:
            return 0, f"no answer within {self.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            return 0, f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
        except aiohttp.ClientError as exc:
            return 0, f"HTTP client error ({type(exc).__name__})"

    async def _record(self, row, status: int, error: str, duration: float) -> None:
        attempt = row["attempts"] + 1
        now = self.clock.now()
        if not error:
            state, next_attempt = "delivered", row["next_attempt"]
        elif attempt >= self.max_attempts:
            state, next_attempt = "failed", row["next_attempt"]
            log.warning("webhook %s: %s event %d given up after %d attempts: %s",
                        row["webhook_id"], row["event"], row["id"], attempt, error)
        else:
            state = "pending"
            next_attempt = now + min(MAX_BACKOFF, self.retry_base * 2 ** (attempt - 1))
        async with self.store.transaction() as db:
            if (await db.execute("SELECT 1 FROM webhooks WHERE id=?",
                                 (row["webhook_id"],))).fetchone() is None:
                return  # deleted while the attempt was under way
            await db.execute("UPDATE webhook_outbox SET attempts=?, next_attempt=?, state=?"
                             " WHERE id=?", (attempt, next_attempt, state, row["id"]))
            await db.execute("INSERT INTO webhook_deliveries (webhook_id, outbox_id, event, time,"
                             " attempt, status_code, error, duration) VALUES (?,?,?,?,?,?,?,?)",
                             (row["webhook_id"], row["id"], row["event"], now, attempt, status,
                              error, duration))
