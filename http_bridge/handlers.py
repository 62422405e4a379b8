"""The REST handlers: validate the HTTP shape, call hypervisord or read the mirror, answer JSON.

No business logic lives here: request bodies go to hypervisord as they are, and it
validates them (its InvalidArgument errors name the field). The bridge checks only
what it needs to build the D-Bus call.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from aiohttp import web
from dbus_fast import Variant

from hypersdk.client.names import (BACKUP_POLICIES, JOB_IFACE, JOB_STATUSES, MANAGER_IFACE,
                                    MANAGER_PATH, PLANS, SCHEDULES, WEBHOOKS, AutomationKind,
                                    job_id_from_path, job_path)
from hypersdk.service import __version__ as BRIDGE_VERSION

from .errors import ApiError, invalid, not_found
from .keys import HUB, METRICS, MIRROR
from .mirror import ServiceMirror, check_dbus_string
from .views import eta_json, job_json, object_json, progress_json, rfc3339

JOB_ID_RE = re.compile(r"^job-[0-9a-f]{1,64}$")
OBJECT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
ASCII_DIGITS_RE = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes '²' and '٣'
MAX_PAGE = 1000
MAX_DEPTH = 32
MIN_INT, MAX_INT = -(1 << 63), (1 << 64) - 1


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


async def json_body(request: web.Request) -> dict:
    """The request body as a JSON object; errors name the body and the rule.

    Content-Type must be application/json: a browser cannot send that cross-origin
    without a CORS preflight (which the bridge never grants), so no other site can
    make a user's browser submit jobs (CSRF), even on a loopback bridge without auth.
    """
    if request.content_type != "application/json":
        raise ApiError(415, "UnsupportedMediaType", "body: Content-Type must be "
                       f"application/json, found {request.content_type or 'none'}", "body")
    raw = await request.read()
    if not raw.strip():
        raise invalid("body", "expected a JSON object, found an empty body")
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise invalid("body", "expected a JSON object")
        check_json(value, "body")
    except json.JSONDecodeError as exc:
        raise invalid("body", f"malformed JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
    except UnicodeDecodeError:
        raise invalid("body", "malformed JSON: not UTF-8 text") from None
    except ValueError:  # json.loads refuses integers of more than 4300 digits
        raise invalid("body", "numbers must be integers from -2^63 to 2^64-1 or finite "
                              "floats") from None
    except RecursionError:
        raise invalid("body", f"nested deeper than {MAX_DEPTH} levels") from None
    return value


def check_json(value: Any, where: str, depth: int = 0) -> None:
    """What hypervisord can take: keys and strings are Unicode text without NUL (D-Bus
    carries nothing else, and hypervisord quotes them back in its errors), nesting is at
    most MAX_DEPTH levels, numbers are finite and fit 64 bits (D-Bus and SQLite)."""
    if depth > MAX_DEPTH:
        raise invalid("body", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        check_dbus_string(where, value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int) and not MIN_INT <= value <= MAX_INT:
        raise invalid(where, "expected an integer from -2^63 to 2^64-1")
    elif isinstance(value, float) and not math.isfinite(value):
        raise invalid(where, "expected a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_dbus_string(where, key)
            check_json(item, f"{where}.{key}" if where != "body" else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]", depth + 1)


def as_dbus_json(value: Any) -> str:
    """Re-serialise a body for hypervisord; ASCII-only, so any text survives the bus."""
    return json.dumps(value, ensure_ascii=True)


def query_text(request: web.Request, name: str, required: bool = True) -> str:
    value = request.query.get(name, "")
    if required and not value:
        raise invalid(name, "a non-empty query parameter is required")
    return check_dbus_string(name, value)


def query_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not ASCII_DIGITS_RE.fullmatch(text) or int(text) > maximum:
        raise invalid(name, f"expected an integer from 0 to {maximum}")
    return int(text)


async def call(request: web.Request, path: str, interface: str, member: str, signature: str,
               body: list) -> list:
    """hypervisord's `member`, called on behalf of the request's authenticated caller."""
    return await request.app[MIRROR].call_as(request["identity"], path, interface, member,
                                             signature, body)


def _plain(record: dict[str, Variant]) -> dict[str, Any]:
    return {name: variant.value for name, variant in record.items()}


async def job_props(request: web.Request, job_id: str, field: str = "job_id") -> dict:
    """A job's properties: mirrored while it is on the bus, else its record from the store
    (Manager.GetJob: finished jobs leave the bus after daemon.finished_job_linger).
    NotFound naming the field when there is no such job."""
    if JOB_ID_RE.match(job_id):
        props = request.app[MIRROR].get(job_path(job_id), JOB_IFACE)
        if props is not None:
            return props
        try:
            (record,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "GetJob", "sa{sv}",
                                   [job_id, {}])
            return _plain(record)
        except ApiError as exc:
            if exc.status != 404:
                raise
    raise not_found(field, f"{field}: no job {job_id!r}")


async def job_records(request: web.Request, filters: dict[str, Variant], limit: int,
                      offset: int) -> tuple[list[dict], int]:
    """A page of stored jobs (Manager.ListJobRecords) and how many match; asks again
    where hypervisord ended a page early to keep its reply small."""
    jobs: list[dict] = []
    while True:
        options = {**filters, "limit": Variant("u", limit - len(jobs)),
                   "offset": Variant("t", offset + len(jobs))}
        records, total = await call(request, MANAGER_PATH, MANAGER_IFACE, "ListJobRecords",
                                    "a{sv}", [options])
        jobs += [_plain(record) for record in records]
        if not records or len(jobs) >= limit or offset + len(jobs) >= total:
            return jobs, total


def submitted(request: web.Request, path: str) -> web.Response:
    """The spec's answer to a submission: {job_id, status: pending, created_at}."""
    job_id = job_id_from_path(path)
    request["audit_target"] = job_id
    props = request.app[MIRROR].get(path, JOB_IFACE) or {}
    created = rfc3339(props.get("CreatedTime", 0)) or rfc3339(int(time.time() * 1_000_000))
    return json_response({"job_id": job_id, "status": "pending", "created_at": created})


# -- service ----------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    if not mirror.healthy:
        return json_response({"status": "unhealthy", "version": BRIDGE_VERSION,
                              "reason": mirror.reason}, status=503)
    manager = mirror.get(MANAGER_PATH, MANAGER_IFACE) or {}
    return json_response({"status": "healthy", "version": manager.get("Version", "")})


def _capabilities(request: web.Request) -> dict:
    """hypervisord's Capabilities property (JSON), {} while it is unknown."""
    manager = request.app[MIRROR].get(MANAGER_PATH, MANAGER_IFACE) or {}
    try:
        caps = json.loads(manager.get("Capabilities", "{}"))
    except ValueError:
        return {}
    return caps if isinstance(caps, dict) else {}


async def capabilities(request: web.Request) -> web.Response:
    manager = request.app[MIRROR].get(MANAGER_PATH, MANAGER_IFACE) or {}
    return json_response({"version": manager.get("Version", ""), **_capabilities(request)})


async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    text = request.app[METRICS].render(request.app[MIRROR], len(hub.clients),
                                       hub.dropped_total, hub.disconnected_slow)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# -- VMs ----------------------------------------------------------------------------------
async def vms_list(request: web.Request) -> web.Response:
    body = await json_body(request)
    for key in body:
        if key not in ("provider", "filter"):
            raise invalid(key, "unknown field; expected provider and filter")
    provider = body.get("provider")
    if not isinstance(provider, str) or not provider:
        raise invalid("provider", "a provider name (string) is required")
    vm_filter = body.get("filter") or {}
    if not isinstance(vm_filter, dict):
        raise invalid("filter", "expected a JSON object")
    (reply,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "ListVMs", "ssa{sv}",
                          [check_dbus_string("provider", provider), as_dbus_json(vm_filter), {}])
    vms = json.loads(reply)
    return json_response({"provider": provider, "vms": vms, "total": len(vms)})


async def vms_info(request: web.Request) -> web.Response:
    identifier = query_text(request, "identifier")
    provider = query_text(request, "provider", required=False) or _only_provider(request)
    (reply,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "GetVMInfo", "ssa{sv}",
                          [provider, identifier, {}])
    return json_response(json.loads(reply))


def _only_provider(request: web.Request) -> str:
    """The one provider the config names (else the one there is, the always-on ova),
    for a /vms/info without `provider`: the spec's `?identifier=vm-123&provider=vsphere`,
    pasted unquoted into a shell, loses it."""
    rows = [row for row in _capabilities(request).get("providers", [])
            if isinstance(row, dict) and row.get("configured")]
    names = ([row.get("name") for row in rows if not row.get("implicit")]
             or [row.get("name") for row in rows])
    if len(names) != 1:
        which = (f"{len(names)} providers are configured ({', '.join(map(str, names))})"
                 if names else "no provider is configured")
        raise invalid("provider", f"a non-empty query parameter is required: {which}")
    return str(names[0])


# -- jobs -------------------------------------------------------------------------------
async def _submit_to(request: web.Request, member: str) -> web.Response:
    body = await json_body(request)
    (path,) = await call(request, MANAGER_PATH, MANAGER_IFACE, member, "sa{sv}",
                         [as_dbus_json(body), {}])
    return submitted(request, path)


async def jobs_submit(request: web.Request) -> web.Response:
    return await _submit_to(request, "SubmitJob")


async def convert(request: web.Request) -> web.Response:
    return await _submit_to(request, "Convert")


async def import_to_kvm(request: web.Request) -> web.Response:
    return await _submit_to(request, "ImportToKvm")


async def jobs_query(request: web.Request) -> web.Response:
    return json_response(job_json(await job_props(request, query_text(request, "job_id"))))


async def jobs_progress(request: web.Request) -> web.Response:
    return json_response(progress_json(await job_props(request, request.match_info["id"],
                                                       "id")))


async def jobs_eta(request: web.Request) -> web.Response:
    return json_response(eta_json(await job_props(request, request.match_info["id"], "id")))


async def jobs_list(request: web.Request) -> web.Response:
    """Every stored job, oldest first, from hypervisord's store (finished jobs are not on
    the bus for long, so the mirror cannot answer this)."""
    status = request.query.get("status", "")
    if status and status not in JOB_STATUSES:
        raise invalid("status", "expected one of " + ", ".join(JOB_STATUSES))
    provider = query_text(request, "provider", required=False)
    limit = query_int(request, "limit", 100, MAX_PAGE)
    offset = query_int(request, "offset", 0, 1 << 31)
    filters = {name: Variant("s", value) for name, value in
               (("status", status), ("provider", provider)) if value}
    jobs, total = await job_records(request, filters, limit, offset)
    return json_response({"jobs": [job_json(props) for props in jobs], "total": total,
                          "limit": limit, "offset": offset})


async def jobs_cancel(request: web.Request) -> web.Response:
    props = await job_props(request, request.match_info["id"], "id")
    request["audit_target"] = props.get("Id")
    await call(request, MANAGER_PATH, MANAGER_IFACE, "CancelJob", "sa{sv}", [props["Id"], {}])
    return json_response({"job_id": props.get("Id"), "status": props.get("Status"),
                          "cancel_requested": True})


async def jobs_cutover(request: web.Request) -> web.Response:
    """Start a warm export's cutover (the Job's Cutover)."""
    props = await job_props(request, request.match_info["id"], "id")
    request["audit_target"] = props.get("Id")
    await call(request, MANAGER_PATH, MANAGER_IFACE, "CutoverJob", "sa{sv}", [props["Id"], {}])
    return json_response({"job_id": props.get("Id"), "cutover_requested": True})


async def jobs_retry(request: web.Request) -> web.Response:
    """Submit a failed or cancelled job's definition again, as a new job."""
    props = await job_props(request, request.match_info["id"], "id")
    (new_path,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "RetryJob", "sa{sv}",
                             [props["Id"], {}])
    return submitted(request, new_path)


# -- disks --------------------------------------------------------------------------------
async def parse_vmdk(request: web.Request) -> web.Response:
    path = query_text(request, "path")
    (reply,) = await call(request, MANAGER_PATH, MANAGER_IFACE, "ParseVmdk", "sa{sv}",
                          [path, {}])
    return json_response(json.loads(reply))


# -- schedules, backup policies, webhooks -----------------------------------------------------
class AutomationRoutes:
    """The REST handlers of one kind of automation object (see AutomationKind)."""

    def __init__(self, kind: AutomationKind) -> None:
        self.kind = kind
        self.url = kind.name.replace("_", "-")
        self.prefix = kind.path
        self.interface = kind.interface
        self.list_key = kind.name

    def find(self, mirror: ServiceMirror, object_id: str) -> tuple[str, dict]:
        if OBJECT_ID_RE.match(object_id):
            for path, ifaces in mirror.under(self.prefix).items():
                props = ifaces.get(self.interface)
                segment = path.rsplit("/", 1)[-1]
                if props is not None and object_id in (props.get("Id"), segment,
                                                       segment.replace("_", "-")):
                    return path, props
        raise not_found("id", f"id: no {self.url.rstrip('s').replace('-', ' ')} {object_id!r}")

    async def create_handler(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mirror = request.app[MIRROR]
        (path,) = await call(request, MANAGER_PATH, MANAGER_IFACE, self.kind.create_method, "sa{sv}",
                             [as_dbus_json(body), {}])
        answer = object_json(path, mirror.get(path, self.interface) or {})
        request["audit_target"] = answer["id"]
        return json_response(answer)

    async def list_handler(self, request: web.Request) -> web.Response:
        objects = [object_json(path, ifaces[self.interface])
                   for path, ifaces in sorted(request.app[MIRROR].under(self.prefix).items())
                   if self.interface in ifaces]
        return json_response({self.list_key: objects, "total": len(objects)})

    async def delete_handler(self, request: web.Request) -> web.Response:
        mirror = request.app[MIRROR]
        path, props = self.find(mirror, request.match_info["id"])
        answer_id = object_json(path, props)["id"]
        request["audit_target"] = answer_id
        await call(request, path, self.interface, "Delete", "a{sv}", [{}])
        return json_response({"id": answer_id, "deleted": True})


SCHEDULE_ROUTES = AutomationRoutes(SCHEDULES)
BACKUP_POLICY_ROUTES = AutomationRoutes(BACKUP_POLICIES)
WEBHOOK_ROUTES = AutomationRoutes(WEBHOOKS)


class PlanRoutes(AutomationRoutes):
    """/plans: create (POST /plans), a paged list, one plan, its preflight, start, cancel
    and report (service/dbus/org.hypersdk.HyperSDK1.Plan.xml)."""

    async def list_handler(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, MAX_PAGE)
        offset = query_int(request, "offset", 0, 1 << 31)
        plans = sorted((object_json(path, ifaces[self.interface])
                        for path, ifaces in request.app[MIRROR].under(self.prefix).items()
                        if self.interface in ifaces),
                       key=lambda plan: (plan.get("created_time", 0), plan["id"]))
        return json_response({"plans": plans[offset:offset + limit], "total": len(plans),
                              "limit": limit, "offset": offset})

    async def show_handler(self, request: web.Request) -> web.Response:
        path, props = self.find(request.app[MIRROR], request.match_info["id"])
        return json_response(object_json(path, props))

    async def _call(self, request: web.Request, member: str) -> tuple[str, list]:
        path, props = self.find(request.app[MIRROR], request.match_info["id"])
        request["audit_target"] = props.get("Id")
        return props.get("Id", ""), await call(request, path, self.interface, member,
                                               "a{sv}", [{}])

    async def preflight_handler(self, request: web.Request) -> web.Response:
        _plan_id, (report,) = await self._call(request, "Preflight")
        return json_response(json.loads(report))

    async def start_handler(self, request: web.Request) -> web.Response:
        plan_id, _ = await self._call(request, "Start")
        return json_response({"id": plan_id, "start_requested": True})

    async def cutover_handler(self, request: web.Request) -> web.Response:
        plan_id, (jobs,) = await self._call(request, "Cutover")
        return json_response({"id": plan_id, "cutover_jobs": jobs})

    async def cancel_handler(self, request: web.Request) -> web.Response:
        plan_id, _ = await self._call(request, "Cancel")
        return json_response({"id": plan_id, "cancel_requested": True})

    async def report_handler(self, request: web.Request) -> web.Response:
        _plan_id, (report,) = await self._call(request, "GetReport")
        return json_response(json.loads(report))


PLAN_ROUTES = PlanRoutes(PLANS)
