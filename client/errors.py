"""D-Bus error replies as ClientError: a message a person can read, and the raw reply.

The console shows `message`; the bridge maps `dbus_error` to an HTTP status and shows
`text`, the service's own words. Errors with no reply behind them (no connection, no
answer in time) have `dbus_error == ""`.
"""
from __future__ import annotations

from dbus_fast import Message

from .names import BUS_NAME, ERROR_PREFIX

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
NO_OWNER = ("org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner")


class ClientError(Exception):
    """`name` is the short error name (AccessDenied, NotFound, NoConnection, ...)."""

    def __init__(self, message: str, name: str = "Failed", dbus_error: str = "",
                 text: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.dbus_error = dbus_error
        self.text = text or message

    @property
    def access_denied(self) -> bool:
        return self.name == "AccessDenied"

    @property
    def unavailable(self) -> bool:
        """hypervisord cannot be reached (as opposed to: it answered no)."""
        return self.name in ("ServiceUnknown", "NoConnection", "Timeout")

    def __str__(self) -> str:
        return self.message


def error_from_reply(reply: Message) -> ClientError:
    """An ERROR reply -> ClientError with a human message."""
    error_name = reply.error_name or ""
    text = str(reply.body[0]) if reply.body else error_name

    def error(message: str, name: str) -> ClientError:
        return ClientError(message, name, error_name, text)

    if error_name == ACCESS_DENIED and text.startswith("Rejected send message"):
        # the bus itself refused (data/dbus-1/system.d): not a polkit answer
        return error("permission denied: only root and members of group hypersdk may "
                     "talk to hypervisord (ask an administrator to add you to the group)",
                     "AccessDenied")
    if error_name == ACCESS_DENIED:
        return error(f"permission denied: {text}", "AccessDenied")
    if error_name.startswith(ERROR_PREFIX):
        return error(text, error_name[len(ERROR_PREFIX):])
    if error_name in NO_OWNER:
        return error(f"hypervisord is not running (nobody owns {BUS_NAME})", "ServiceUnknown")
    if error_name == "org.freedesktop.DBus.Error.UnknownObject":
        return error(text, "NotFound")
    return error(f"{error_name}: {text}", error_name.rsplit(".", 1)[-1])
