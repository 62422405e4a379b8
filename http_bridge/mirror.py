"""The bridge's one connection to hypervisord: the shared client's object mirror, with
every call made on behalf of the REST caller.

REST reads come from the mirror (hypersdk.client.objects) and never cross the bus.
"""
from __future__ import annotations

from dbus_fast import Variant

from hypersdk.client.errors import ClientError
from hypersdk.client.objects import ServiceObjects

from .auth import Identity
from .errors import from_client_error, invalid, unavailable


def check_dbus_string(field: str, value: str) -> str:
    """D-Bus strings are valid UTF-8 without NUL; refuse others before they reach the bus."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(field, "must be valid Unicode text (no lone surrogates)") from None
    if "\x00" in value:
        raise invalid(field, "must not contain NUL characters")
    return value


class ServiceMirror(ServiceObjects):
    async def call_as(self, principal: Identity, path: str, interface: str, member: str,
                      signature: str, body: list) -> list:
        """Call hypervisord on behalf of `principal`; errors become ApiError.

        Every method of hypervisord ends with `options a{sv}`: the REST identity goes
        there as `requested_by` and `requested_role`, so hypervisord (which trusts them
        from the bridge's uid only) records and authorises the end user, not the bridge.
        """
        if not self.healthy:
            raise unavailable(self.reason or "hypervisord is not available")
        *arguments, options = body
        options = {**options, "requested_by": Variant("s", principal.name),
                   "requested_role": Variant("s", principal.role)}
        try:
            return await self.call(path, interface, member, signature, [*arguments, options])
        except ClientError as exc:
            raise from_client_error(exc) from None
