"""Every error a client sees: one table from D-Bus error names to HTTP status and code.

A response body is always `{"error": CODE, "message": TEXT, "field": NAME|null}`;
no traceback ever reaches a client (unexpected exceptions become a 500 whose message
points at the bridge's journal).
"""
from __future__ import annotations

import json
import re

from aiohttp import web

from hypersdk.client.errors import ACCESS_DENIED, ClientError

DBUS_ERROR_TABLE: dict[str, tuple[int, str]] = {
    "org.hypersdk.HyperSDK1.Error.InvalidArgument": (400, "InvalidArgument"),
    "org.hypersdk.HyperSDK1.Error.NotFound": (404, "NotFound"),
    "org.hypersdk.HyperSDK1.Error.AlreadyExists": (409, "AlreadyExists"),
    "org.hypersdk.HyperSDK1.Error.NotAuthorized": (403, "Forbidden"),
    "org.hypersdk.HyperSDK1.Error.Cancelled": (409, "Cancelled"),
    # A peer of the service (a provider, libvirt, hyper2kvm, an optional extra) cannot be
    # used: the request is understood but cannot be carried out as the service is set up.
    # 503 is kept for "hypervisord itself cannot be reached", so clients can tell them apart.
    "org.hypersdk.HyperSDK1.Error.Unavailable": (422, "Unavailable"),
    "org.hypersdk.HyperSDK1.Error.Failed": (422, "Failed"),
    ACCESS_DENIED: (403, "Forbidden"),
    "org.freedesktop.DBus.Error.InvalidArgs": (400, "InvalidArgument"),
    "org.freedesktop.DBus.Error.UnknownObject": (404, "NotFound"),
    "org.freedesktop.DBus.Error.UnknownMethod": (404, "NotFound"),
    "org.freedesktop.DBus.Error.ServiceUnknown": (503, "ServiceUnavailable"),
    "org.freedesktop.DBus.Error.NameHasNoOwner": (503, "ServiceUnavailable"),
    "org.freedesktop.DBus.Error.NoReply": (503, "ServiceUnavailable"),
    "org.freedesktop.DBus.Error.Timeout": (503, "ServiceUnavailable"),
    "org.freedesktop.DBus.Error.Disconnected": (503, "ServiceUnavailable"),
}
UNKNOWN_DBUS_ERROR = (422, "Failed")
_FIELD_RE = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, "field": self.field}

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=json.dumps(self.body()),
                            content_type="application/json")


def invalid(field: str, rule: str) -> ApiError:
    return ApiError(400, "InvalidArgument", f"{field}: {rule}", field)


def not_found(field: str, message: str) -> ApiError:
    return ApiError(404, "NotFound", message, field)


def unavailable(reason: str) -> ApiError:
    return ApiError(503, "ServiceUnavailable", reason)


def from_client_error(error: ClientError) -> ApiError:
    """A failed call to hypervisord -> ApiError (503 when no reply came at all)."""
    if not error.dbus_error:
        return unavailable(error.message)
    return from_dbus(error.dbus_error, error.text)


def from_dbus(error_name: str, message: str) -> ApiError:
    """Map a D-Bus error reply to an ApiError; InvalidArgument names its field."""
    status, code = DBUS_ERROR_TABLE.get(error_name, UNKNOWN_DBUS_ERROR)
    field = None
    if code == "InvalidArgument":
        match = _FIELD_RE.match(message)
        field = match.group(1) if match else None
    if error_name == ACCESS_DENIED:  # polkit's word on the caller (or the bridge's user)
        message = f"hypervisord refused: {message}"
    return ApiError(status, code, message, field)


def from_http(exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (404 route, 405, 413 ...) in our JSON shape."""
    codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge",
             400: "BadRequest"}
    message = exc.text if exc.text and not exc.text.startswith("<") else exc.reason
    if exc.status == 413:
        message = f"request body: larger than the limit of {_limit_of(exc)} bytes"
        return ApiError(413, "PayloadTooLarge", message, "body")
    return ApiError(exc.status, codes.get(exc.status, exc.reason.replace(" ", "")),
                    message.removeprefix(f"{exc.status}: "))


def _limit_of(exc: web.HTTPException) -> str:
    match = re.search(r"Maximum request body size (\d+)", exc.text or "")
    return match.group(1) if match else "the configured"
