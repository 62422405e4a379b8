"""pyvmomi sessions to one vSphere endpoint: a small pool, re-login, timeouts, clear errors.

pyvmomi is blocking, so every call runs in a worker thread through `SessionPool.run`,
which lends one logged-in ServiceInstance to a function and gives it back afterwards.
The socket timeout (`timeout` in the config) bounds each SOAP call. A session that
the server has expired (`NotAuthenticated`) is logged in again and the function
retried once. Connection failures become `Unavailable` errors naming host and cause;
the password never appears in them.

`host` may carry the port (`vc:8443`, `[fd00::1]:8443`): `finish_config` moves it to
`port` when the config is read, so SOAP, the datastore and the tags REST URLs all use
the same host and port (`base_url`).
"""
from __future__ import annotations

import asyncio
import re
import socket
import ssl
from typing import Any, Callable, TypeVar

from ..config_schema import ConfigProblem
from ..errors import Unavailable

T = TypeVar("T")
DEFAULT_PORT = 443
HOST_RULE = "a host name or address, optionally with :PORT (vc.example.com, vc:8443, [fd00::1]:8443)"
_HOST_PORT_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s/:\[\]@]+))"
                           r"(?::(?P<port>[0-9]{1,5}))?$")
_BARE_V6_RE = re.compile(r"^[0-9A-Fa-f]*:[0-9A-Fa-f:.]*$")


def split_host(value: str) -> tuple[str, int | None] | None:
    """'vc:8443' -> ('vc', 8443), 'vc' -> ('vc', None), '[fd00::1]:8443' -> ('fd00::1', 8443),
    'fd00::1' -> ('fd00::1', None); None when `value` is not a host (a URL, a path, port 0)."""
    if _BARE_V6_RE.match(value) and value.count(":") >= 2:
        return value, None
    match = _HOST_PORT_RE.match(value)
    if not match:
        return None
    port = int(match.group("port")) if match.group("port") else None
    if port is not None and not 0 < port < 65536:
        return None
    return match.group("v6") or match.group("name"), port


def host_rule(value: str) -> str | None:
    """Config check of `providers.<vsphere>.host`."""
    return None if split_host(value) else HOST_RULE


def finish_config(settings: dict, path: str) -> list[ConfigProblem]:
    """Move a port written in `host` to `port` (443 when neither names one); a port in
    both places must be the same."""
    if "host" not in settings or split_host(settings["host"]) is None:
        return []  # reported by the schema already
    host, in_host = split_host(settings["host"])
    given = settings.get("port")
    if in_host is not None and given is not None and given != in_host:
        return [ConfigProblem(f"{path}.port", f"the port written in host ({in_host}) or no port",
                              repr(given))]
    settings["host"] = host
    settings["port"] = in_host or given or DEFAULT_PORT
    return []


class SessionPool:
    def __init__(self, provider_name: str, settings: dict) -> None:
        self.provider_name = provider_name
        self.host: str = settings["host"]
        self.port: int = settings["port"]
        self.protocol: str = settings.get("protocol", "https")
        self.username: str = settings["username"]
        self.insecure: bool = settings["insecure"]
        self.timeout: float = settings["timeout"]
        self.size: int = settings["connection_pool_size"]
        self._settings = settings
        self._free: asyncio.Queue = asyncio.Queue()
        self._created = 0
        self._all: list[Any] = []

    @property
    def where(self) -> str:
        return f"vSphere {self.url_host}:{self.port}"

    @property
    def url_host(self) -> str:
        """The host as a URL names it (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def base_url(self) -> str:
        """`https://host:port`, the root of every HTTP URL of the endpoint."""
        return f"{self.protocol}://{self.url_host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.protocol != "https":
            return None
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def password(self) -> str:
        """The configured password, or the first line of password_file (blocking)."""
        if self._settings.get("password"):
            return self._settings["password"]
        path = self._settings.get("password_file")
        if not path:
            raise Unavailable(f"{self.where}: providers.{self.provider_name} needs password "
                              f"or password_file")
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.readline().rstrip("\r\n")
        except OSError as exc:
            raise Unavailable(f"{self.where}: cannot read password_file {path}: "
                              f"{exc.strerror}") from None

    def _login(self):
        """A new logged-in ServiceInstance (blocking), or Unavailable saying why not."""
        from pyVim.connect import SmartConnect
        from pyVmomi import vim

        try:
            return SmartConnect(protocol=self.protocol, host=self.host, port=self.port,
                                user=self.username, pwd=self.password(),
                                sslContext=self.ssl_context(),
                                httpConnectionTimeout=self.timeout)
        except vim.fault.InvalidLogin:
            raise Unavailable(f"{self.where}: login refused for user {self.username!r} "
                              f"(wrong user name or password)") from None
        except ssl.SSLCertVerificationError as exc:
            raise Unavailable(
                f"{self.where}: the TLS certificate is not trusted ({exc.verify_message}); "
                f"install its CA or set providers.{self.provider_name}.insecure: true") from None
        except ssl.SSLError as exc:
            raise Unavailable(f"{self.where}: TLS handshake failed ({exc.reason})") from None
        except (socket.timeout, TimeoutError):
            raise Unavailable(f"{self.where}: no answer within {self.timeout:g}s") from None
        except OSError as exc:
            cause = exc.strerror or str(exc) or type(exc).__name__
            raise Unavailable(f"{self.where} is unreachable: {cause}") from None
        except vim.fault.VimFault as exc:
            raise Unavailable(f"{self.where}: login failed: {exc.msg}") from None

    async def _acquire(self):
        if self._free.empty() and self._created < self.size:
            self._created += 1
            try:
                si = await asyncio.to_thread(self._login)
            except BaseException:
                self._created -= 1
                raise
            self._all.append(si)
            return si
        return await self._free.get()

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(si, *args)` in a thread with a pooled session; re-login once if expired."""
        from pyVmomi import vim

        si = await self._acquire()
        try:
            try:
                return await asyncio.to_thread(func, si, *args)
            except vim.fault.NotAuthenticated:
                fresh = await asyncio.to_thread(self._login)
                self._all[self._all.index(si)] = fresh
                si = fresh
                return await asyncio.to_thread(func, si, *args)
        except (socket.timeout, TimeoutError):
            raise Unavailable(f"{self.where}: no answer within {self.timeout:g}s") from None
        finally:
            self._free.put_nowait(si)

    @staticmethod
    def cookie(si) -> str:
        """The session cookie, for HTTP transfers (datastore /folder, NFC lease URLs)."""
        return si._stub.cookie

    async def close(self) -> None:
        from pyVim.connect import Disconnect

        for si in self._all:
            try:
                await asyncio.to_thread(Disconnect, si)
            except Exception:  # the server may be gone already; nothing to release then
                pass
        self._all.clear()
        self._created = 0
        self._free = asyncio.Queue()
