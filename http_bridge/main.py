"""`hypersdk-bridge --config PATH`: the REST + WebSocket API, a D-Bus client of hypervisord.

It reads the same config file as hypervisord: `daemon.address` to listen on and
`api.*` for auth, the names and origins it serves, TLS, the body limit and the audit
log. A broken setting stops it at start with a message naming the setting; nothing
is served half-configured. `--init-tokens` (as root) creates the tokens file with a
first admin token when it is missing (init_tokens.py), then exits.
"""
from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
from pathlib import Path

from aiohttp import web

import yaml

from hypersdk.service.config import DEFAULT_CONFIG_PATH, Config, ConfigError, parse_config
from hypersdk.service.config_schema import ConfigProblem

from .app import create_app
from .audit import AuditLog
from .auth import Authenticator, TokenFileError, is_loopback, load_tokens
from .guard import RequestGuard
from .init_tokens import InitTokensError, init_tokens

log = logging.getLogger("hypersdk.bridge")
SHUTDOWN_TIMEOUT = 10.0


BRIDGE_SECTIONS = ("daemon", "api")


class SetupError(Exception):
    """A setting the bridge cannot run with; the message names it."""


class AccessLogger(web.AbstractAccessLogger):
    """Method, path (never the query: it may hold ?access_token=), status, size, time."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.1fms', request.remote, request.method,
                         request.path, response.status, response.body_length, time * 1000)


def load_bridge_config(path: Path) -> Config:
    """hypervisord's config file, validated, but only the sections the bridge uses.

    Provider credentials in the same file are never read into the bridge, and their
    `${VAR}`s (set in hypervisord's environment, not the bridge's) need not resolve.
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "a readable file",
                                         exc.strerror or str(exc))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(str(path), "valid YAML",
                                         str(exc).splitlines()[0])]) from None
    if not isinstance(document, dict):
        document = {} if document is None else document
    else:
        document = {k: v for k, v in document.items() if k in BRIDGE_SECTIONS}
    return parse_config(document, str(path))


def listen_address(config: Config) -> tuple[str, int]:
    host, _, port = config.daemon.address.rpartition(":")
    return host.strip("[]"), int(port)


def listen_socket(host: str, port: int) -> socket.socket:
    """The bridge's listening socket, bound before the app starts: with port 0 the
    kernel picks a free port, and the log line says which (what tests start it with)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def shown_address(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def authenticator(config: Config, host: str) -> Authenticator:
    if config.api.auth == "none":
        if not is_loopback(host):
            raise SetupError(f"api.auth: none is allowed only when daemon.address is a "
                             f"loopback address, found {config.daemon.address}; "
                             "set api.auth: token and api.tokens_file")
        log.warning("api.auth is none: every local client is an admin (loopback only)")
        return Authenticator(None)
    try:
        tokens = load_tokens(Path(config.api.tokens_file))
    except TokenFileError as exc:
        raise SetupError(f"api.tokens_file: {exc}") from None
    log.info("loaded %d API tokens", len(tokens))
    return Authenticator(tokens, Path(config.api.tokens_file))


def tls_context(config: Config) -> ssl.SSLContext | None:
    cert, key = config.api.tls_cert, config.api.tls_key
    if not cert and not key:
        return None
    if not cert or not key:
        raise SetupError("api.tls_cert and api.tls_key: set both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"api.tls_cert/api.tls_key: cannot load ({exc})") from None
    return context


def open_audit_log(config: Config) -> AuditLog:
    try:
        return AuditLog(Path(config.api.audit_log))
    except OSError as exc:
        raise SetupError(f"api.audit_log: cannot open {config.api.audit_log} for appending "
                         f"({exc.strerror or exc})") from None


def _init_tokens(config: Config) -> int:
    try:
        print(init_tokens(Path(config.api.tokens_file), config.api.bridge_user))
    except InitTokensError as exc:
        print(f"hypersdk-bridge: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypersdk-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"hypervisord's config file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--bus", default="system",
                        help="system (default, honours DBUS_SYSTEM_BUS_ADDRESS), session "
                             "or a D-Bus address")
    parser.add_argument("--init-tokens", action="store_true",
                        help="create api.tokens_file with a first admin token if it is "
                             "missing (as root), then exit")
    args = parser.parse_args(argv)
    try:
        config = load_bridge_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.init_tokens:
        return _init_tokens(config)
    logging.basicConfig(level=config.daemon.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = listen_address(config)
        auth = authenticator(config, host)
        ssl_context = tls_context(config)
        audit = open_audit_log(config)
    except SetupError as exc:
        print(f"hypersdk-bridge: {exc}", file=sys.stderr)
        return 2
    guard = RequestGuard(config.api.server_names, config.api.allowed_origins,
                         "https" if ssl_context else "http")
    app = create_app(bus=args.bus, authenticator=auth, guard=guard, audit=audit,
                     max_body_bytes=config.api.max_body_bytes)
    try:
        sock = listen_socket(host, port)
    except OSError as exc:
        audit.close()
        print(f"hypersdk-bridge: daemon.address: cannot listen on {config.daemon.address} "
              f"({exc.strerror or exc})", file=sys.stderr)
        return 1
    # always said, whatever the log level: tools and tests started on port 0 read it
    scheme = "https" if ssl_context else "http"
    print(f"hypersdk-bridge: listening on {shown_address(sock, scheme)}", file=sys.stderr,
          flush=True)
    try:
        web.run_app(app, sock=sock, ssl_context=ssl_context, print=None,
                    access_log_class=AccessLogger, shutdown_timeout=SHUTDOWN_TIMEOUT,
                    handler_cancellation=True)
    finally:
        audit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
