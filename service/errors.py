"""Errors that reach users, each with a stable name.

Every error a caller can see is a `HyperSDKError`. Its `name` is the suffix of the
D-Bus error name (`org.hypersdk.HyperSDK1.Error.<name>`) and the REST bridge maps
those names to HTTP status codes in one table. `field` names the piece of input
that broke a rule, when there is one.
"""
from __future__ import annotations

ERROR_PREFIX = "org.hypersdk.HyperSDK1.Error."


class HyperSDKError(Exception):
    """Base class: a failure with a stable name and a human message."""

    name = "Failed"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def dbus_name(self) -> str:
        return ERROR_PREFIX + self.name

    def __str__(self) -> str:
        return self.message


class InvalidArgument(HyperSDKError):
    """Input broke a rule. The message names the field and the rule."""

    name = "InvalidArgument"

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}" if field else rule, field=field or None)
        self.rule = rule


class NotFound(HyperSDKError):
    name = "NotFound"


class AlreadyExists(HyperSDKError):
    name = "AlreadyExists"


class NotAuthorized(HyperSDKError):
    name = "NotAuthorized"


class Unavailable(HyperSDKError):
    """A peer (provider, libvirt, hyper2kvm, a missing extra) cannot be used now."""

    name = "Unavailable"


class Cancelled(HyperSDKError):
    name = "Cancelled"


class Failed(HyperSDKError):
    """The operation ran and failed; the message says why."""

    name = "Failed"


class Retryable(Failed):
    """A transient failure: a provider's call retries it (providers/calls.py RetryPolicy),
    and the job engine retries the job with backoff, each up to export.max_retries.
    `retry_after`: the seconds the server asked to wait, when it said."""

    name = "Failed"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
