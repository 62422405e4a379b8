"""Where webhooks may go: public addresses, and private targets the config names.

hypervisord runs as root inside the network, so a webhook URL must not make it a
scanner of the internal network or a client of a link-local metadata service
(169.254.169.254). The rule is checked twice:

- when a webhook is configured: a URL whose host is an address, in any form the
  resolver reads (`127.1`, `2130706433`, `[::ffff:127.0.0.1]`), must be public;
- at delivery: the name is resolved once, and the connection goes only to resolved
  addresses that pass the same check (`PublicOnlyResolver`), so a name that
  pointed at a public address when configured and at 127.0.0.1 now (DNS rebinding)
  is refused. Redirects are never followed (webhooks.py).

`automation.webhook_private_targets` lists the allowed exceptions as `host` or
`host:port` (`[v6]:port`); `host` is the name as written in URLs, or an address.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
TARGETS_SETTING = "automation.webhook_private_targets"


class RefusedTarget(Exception):
    """A delivery would reach an address that is neither public nor allowed."""


def parse_target(text: str) -> tuple[str, int | None]:
    """`host` or `host:port` -> (lower-case host, port or None); ValueError if malformed."""
    host, port = text.strip().lower(), None
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        host, port_text = inner, rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(text)
    elif host.count(":") == 1:
        host, port_text = host.split(":")
    else:
        port_text = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(text)
        port = int(port_text)
    if not host or any(c in host for c in "/@?# "):
        raise ValueError(text)
    return host, port


def targets_rule(values: list[str]) -> str | None:
    """Config check for the allowlist (config_schema Field.check)."""
    for value in values:
        try:
            parse_target(value)
        except ValueError:
            return f"a list of host or host:port entries ({value!r} is neither)"
    return None


def literal_address(host: str) -> Address | None:
    """The address `host` is written as (also IPv4 shorthands such as 127.1), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def kind_of(address: Address) -> str | None:
    """None for a public address; else what it is (loopback, link-local, private ...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "not globally routable"


class TargetPolicy:
    """Public addresses, plus the private targets named in the config."""

    def __init__(self, targets: list[str]) -> None:
        self._allowed = [parse_target(t) for t in targets]

    def _allowed_private(self, host: str, address: Address, port: int) -> bool:
        names = {host.lower().strip("[]"), str(address)}
        return any(name in names and wanted in (None, port) for name, wanted in self._allowed)

    def refusal(self, host: str, address: Address, port: int) -> str | None:
        """Why a delivery to `address` (for `host`) may not go ("127.0.0.1 (loopback)"),
        or None if it may."""
        kind = kind_of(address)
        if kind is None or self._allowed_private(host, address, port):
            return None
        return f"{address} ({kind})"

    @staticmethod
    def explain(reasons: list[str], host: str, port: int) -> str:
        shown = f"[{host}]" if ":" in host else host
        return (f"{', '.join(dict.fromkeys(reasons))}, not a public address; name "
                f"{shown}:{port} in {TARGETS_SETTING} to allow it")

    def url_refusal(self, url: str) -> str | None:
        """Why a URL whose host is written as an address is refused (None: it may go, or
        its host is a name, checked when it is resolved)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        address = literal_address(host)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        reason = self.refusal(host, address, port) if address is not None else None
        return self.explain([reason], host, port) if reason else None


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp, then keeps only addresses the policy lets through, so the
    connection goes to an address that was checked (no second lookup to rebind)."""

    def __init__(self, policy: TargetPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list:
        found = await self._inner.resolve(host, port, family)
        reasons = [self._policy.refusal(host, ipaddress.ip_address(item["host"]), port)
                   for item in found]
        allowed = [item for item, reason in zip(found, reasons) if reason is None]
        if not allowed:
            refused = [reason for reason in reasons if reason]
            raise RefusedTarget(f"refused: {host} resolves to "
                                + self._policy.explain(refused, host, port))
        return allowed

    async def close(self) -> None:
        await self._inner.close()
