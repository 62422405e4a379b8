"""The application factory and the route table (path, handler, least role, mutating)."""
from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web

from . import handlers as h
from . import openapi
from .audit import AuditLog
from .auth import PUBLIC, Authenticator, Identity
from .errors import ApiError, from_http, unavailable
from .guard import RequestGuard
from .keys import AUDIT, AUTH, GUARD, HUB, METRICS, MIRROR, STOPPING
from .logs import job_logs
from .metrics import Metrics
from .mirror import ServiceMirror
from .websocket import WEBSOCKETS, WebSocketHub, close_all

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: str  # public | viewer | operator | admin
    mutating: bool = False
    needs_service: bool = True  # answered 503 while hypervisord is away
    token_in_url: bool = False  # takes ?access_token= (browsers' WebSockets only)


async def openapi_document(request: web.Request) -> web.Response:
    return h.json_response(openapi.document())


async def websocket(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ApiError(426, "UpgradeRequired", "this endpoint speaks WebSocket only; "
                       "send an Upgrade: websocket request")
    return await request.app[HUB].handle(request, request["identity"])


VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
S, B, W, P = h.SCHEDULE_ROUTES, h.BACKUP_POLICY_ROUTES, h.WEBHOOK_ROUTES, h.PLAN_ROUTES
ROUTES: list[Route] = [
    Route("GET", "/health", h.health, PUBLIC, needs_service=False),
    Route("GET", "/openapi.json", openapi_document, PUBLIC, needs_service=False),
    Route("GET", "/capabilities", h.capabilities, VIEWER),
    Route("GET", "/metrics", h.metrics, VIEWER, needs_service=False),
    Route("POST", "/vms/list", h.vms_list, VIEWER),
    Route("GET", "/vms/info", h.vms_info, VIEWER),
    Route("POST", "/jobs/submit", h.jobs_submit, OPERATOR, mutating=True),
    Route("GET", "/jobs", h.jobs_list, VIEWER),
    Route("GET", "/jobs/query", h.jobs_query, VIEWER),
    Route("GET", "/jobs/progress/{id}", h.jobs_progress, VIEWER),
    Route("GET", "/jobs/eta/{id}", h.jobs_eta, VIEWER),
    Route("GET", "/jobs/logs/{id}", job_logs, VIEWER),
    Route("POST", "/jobs/cancel/{id}", h.jobs_cancel, OPERATOR, mutating=True),
    Route("POST", "/jobs/retry/{id}", h.jobs_retry, OPERATOR, mutating=True),
    Route("POST", "/jobs/{id}/cutover", h.jobs_cutover, OPERATOR, mutating=True),
    Route("POST", "/convert", h.convert, OPERATOR, mutating=True),
    Route("POST", "/import-to-kvm", h.import_to_kvm, OPERATOR, mutating=True),
    Route("GET", "/parse-vmdk", h.parse_vmdk, VIEWER),
    Route("GET", "/websocket", websocket, VIEWER, token_in_url=True),
    Route("POST", "/schedules/create", S.create_handler, OPERATOR, mutating=True),
    Route("GET", "/schedules", S.list_handler, VIEWER),
    Route("DELETE", "/schedules/{id}", S.delete_handler, OPERATOR, mutating=True),
    Route("POST", "/backup-policies/create", B.create_handler, OPERATOR, mutating=True),
    Route("GET", "/backup-policies", B.list_handler, VIEWER),
    Route("DELETE", "/backup-policies/{id}", B.delete_handler, OPERATOR, mutating=True),
    Route("POST", "/webhooks/configure", W.create_handler, ADMIN, mutating=True),
    Route("GET", "/webhooks", W.list_handler, VIEWER),
    Route("DELETE", "/webhooks/{id}", W.delete_handler, ADMIN, mutating=True),
    Route("POST", "/plans", P.create_handler, OPERATOR, mutating=True),
    Route("GET", "/plans", P.list_handler, VIEWER),
    Route("GET", "/plans/{id}", P.show_handler, VIEWER),
    Route("POST", "/plans/{id}/preflight", P.preflight_handler, OPERATOR, mutating=True),
    Route("POST", "/plans/{id}/start", P.start_handler, OPERATOR, mutating=True),
    Route("POST", "/plans/{id}/cancel", P.cancel_handler, OPERATOR, mutating=True),
    Route("POST", "/plans/{id}/cutover", P.cutover_handler, OPERATOR, mutating=True),
    Route("GET", "/plans/{id}/report", P.report_handler, VIEWER),
]
ROUTE_KEY = web.AppKey("routes", dict)


def _route_of(request: web.Request) -> Route | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return request.app[ROUTE_KEY].get((request.method, resource.canonical))


async def _answer(request: web.Request, handler: Handler, route: Route | None,
                  max_body: int) -> web.StreamResponse:
    if route is None:
        return await handler(request)  # aiohttp's own 404/405
    auth = request.app[AUTH]
    if route.role != PUBLIC:
        request["identity"] = auth.identify(request, route.token_in_url)
        auth.authorize(request["identity"], route.role)
    if route.needs_service and not request.app[MIRROR].healthy:
        raise unavailable(request.app[MIRROR].reason)
    if request.content_length is not None and request.content_length > max_body:
        raise ApiError(413, "PayloadTooLarge",
                       f"body: larger than the limit of {max_body} bytes", "body")
    return await handler(request)


def api_middleware(max_body: int):
    """Host/Origin checks, auth, JSON errors, metrics and audit around every handler."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route_of(request)
        status, result = 500, "InternalError"
        try:
            request.app[GUARD].check(request, bool(route and route.token_in_url))
            response = await _answer(request, handler, route, max_body)
            status, result = response.status, "ok"
            return response
        except ApiError as exc:
            status, result = exc.status, exc.code
            return exc.response()
        except web.HTTPException as exc:
            error = from_http(exc)
            status, result = error.status, error.code
            return error.response()
        except (asyncio.CancelledError, ConnectionResetError):
            status, result = 499, "ClientClosed"
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return ApiError(500, "InternalError", "internal error in the bridge; "
                            "see its journal").response()
        finally:
            name = route.path if route else "(unmatched)"
            request.app[METRICS].count(request.method, name, status)
            if route and (route.mutating or status in (401, 403)):
                await _audit(request, route, status, result)

    return middleware


async def _audit(request: web.Request, route: Route, status: int, result: str) -> None:
    identity: Identity | None = request.get("identity")
    await request.app[AUDIT].record(
        who=identity.name if identity else "unauthenticated",
        role=identity.role if identity else "",
        remote=request.remote or "", method=request.method, path=request.path,
        status=status, result=result, target=request.get("audit_target"))


def create_app(*, bus: str, authenticator: Authenticator, guard: RequestGuard,
               audit: AuditLog, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[api_middleware(max_body_bytes)])
    app[AUTH] = authenticator
    app[GUARD] = guard
    app[AUDIT] = audit
    app[METRICS] = Metrics()
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STOPPING] = asyncio.Event()
    app[ROUTE_KEY] = {(r.method, r.path): r for r in ROUTES}
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)

    async def service(app: web.Application):
        mirror = ServiceMirror(bus)
        app[MIRROR] = mirror
        app[HUB] = WebSocketHub(mirror)
        await mirror.start()
        yield
        app[HUB].close()
        await mirror.stop()

    async def reload_on_sighup(app: web.Application) -> None:
        def reload() -> None:
            log.warning("SIGHUP: %s", app[AUTH].reload())
            closed = app[HUB].revoke(app[AUTH].still_valid)
            if closed:
                log.warning("closed %d WebSockets whose token was removed or changed", closed)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)

    async def stopping(app: web.Application) -> None:
        app[STOPPING].set()
        await close_all(app)

    app.cleanup_ctx.append(service)
    app.on_startup.append(reload_on_sighup)
    app.on_shutdown.append(stopping)
    return app
