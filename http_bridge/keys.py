"""Typed application keys shared by the handlers (aiohttp AppKey)."""
from __future__ import annotations

import asyncio

from aiohttp import web

from .audit import AuditLog
from .auth import Authenticator
from .guard import RequestGuard
from .metrics import Metrics
from .mirror import ServiceMirror
from .websocket import WebSocketHub

MIRROR = web.AppKey("mirror", ServiceMirror)
HUB = web.AppKey("hub", WebSocketHub)
AUTH = web.AppKey("auth", Authenticator)
GUARD = web.AppKey("guard", RequestGuard)
AUDIT = web.AppKey("audit", AuditLog)
METRICS = web.AppKey("metrics", Metrics)
STOPPING = web.AppKey("stopping", asyncio.Event)
