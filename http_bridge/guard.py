"""What every request must pass before auth: a Host the bridge serves, a trusted Origin,
and no token in the URL outside the WebSocket route.

- Host: a web page on evil.example whose name is made to resolve to 127.0.0.1 (DNS
  rebinding) reaches the bridge with `Host: evil.example`. Only `localhost`, address
  literals (which cannot be rebound) and `api.server_names` are served.
- Origin: browsers send it on cross-origin requests and on every WebSocket handshake
  (which the same-origin policy does not cover). Only the bridge's own origin and
  `api.allowed_origins` are accepted; clients that send none (curl, scripts) pass.
  The bridge sends no CORS headers, so other origins' pages read no REST answers.
- `?access_token=`: URLs end up in logs, proxies and browser histories; only
  /websocket takes a token there, since browsers cannot set headers on it.
"""
from __future__ import annotations

import ipaddress

from aiohttp import web

from .errors import ApiError

LOOPBACK_NAME = "localhost"


def host_name(host: str) -> str:
    """`Host` header -> the lower-case name or address without port and brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RequestGuard:
    def __init__(self, server_names: list[str], allowed_origins: list[str],
                 scheme: str) -> None:
        self._names = {LOOPBACK_NAME, *(name.lower().rstrip(".") for name in server_names)}
        self._origins = {origin.lower().rstrip("/") for origin in allowed_origins}
        self._scheme = scheme

    def check(self, request: web.Request, websocket_route: bool) -> None:
        host = request.headers.get("Host")
        if host is not None:
            self._check_host(host)
        origin = request.headers.get("Origin")
        if origin is not None:
            self._check_origin(origin.lower().rstrip("/"), (host or "").lower())
        if "access_token" in request.query and not websocket_route:
            raise ApiError(400, "InvalidArgument", "access_token: a token in the URL is "
                           "accepted only by /websocket; send Authorization: Bearer <token>",
                           "access_token")

    def _check_host(self, host: str) -> None:
        name = host_name(host)
        if name not in self._names and not _is_address(name):
            raise ApiError(421, "MisdirectedRequest", f"Host: this bridge does not serve "
                           f"{name!r}; it answers to localhost, IP addresses and the names "
                           "in api.server_names", "Host")

    def _check_origin(self, origin: str, host: str) -> None:
        if origin != f"{self._scheme}://{host}" and origin not in self._origins:
            raise ApiError(403, "Forbidden", f"Origin: pages from {origin} may not use this "
                           "API; add the origin to api.allowed_origins to trust it", "Origin")
