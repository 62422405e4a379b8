"""Bearer tokens with roles, read from `api.tokens_file`.

The file is YAML mapping each token to `{name, role}`; it must not be readable by
others nor writable by the group (mode 0600 or 0640), since it holds credentials.
Roles are ordered: viewer < operator < admin; every route names the least role it
needs (`Route.role` in app.py). With `api.auth: none` (allowed only on a loopback
address) every caller is the admin "anonymous".
"""
from __future__ import annotations

import hashlib
import ipaddress
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiohttp import web

from .errors import ApiError

ROLES = ("viewer", "operator", "admin")
PUBLIC = "public"


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


ANONYMOUS_ADMIN = Identity("anonymous", "admin")


class TokenFileError(Exception):
    """The tokens file cannot be used; the message names the file and the rule."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def load_tokens(path: Path) -> dict[str, Identity]:
    """Read the tokens file -> {sha256(token): Identity}; only digests stay in memory."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"{path}: expected a readable tokens file ({exc.strerror})")
    if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
        raise TokenFileError(f"{path}: mode {stat.S_IMODE(mode):04o} lets others read it; "
                             "expected 0600 or 0640")
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TokenFileError(f"{path}: expected valid YAML ({exc})")
    if not isinstance(document, dict):
        raise TokenFileError(f"{path}: expected a mapping of token -> {{name, role}}")
    tokens: dict[str, Identity] = {}
    for index, (token, entry) in enumerate(document.items()):
        where = f"{path}: entry {index + 1}"  # never the token itself
        if not isinstance(token, str) or len(token) < 16:
            raise TokenFileError(f"{where}: expected a token of at least 16 characters")
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TokenFileError(f"{where}: expected {{name: <string>, role: <role>}}")
        if entry.get("role") not in ROLES:
            raise TokenFileError(f"{where}: role expected one of {', '.join(ROLES)}")
        tokens[_digest(token)] = Identity(entry["name"], entry["role"])
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allows(identity: Identity, needed: str) -> bool:
    return needed == PUBLIC or ROLES.index(identity.role) >= ROLES.index(needed)


class Authenticator:
    """Who is calling: from `Authorization: Bearer <token>` (or `?access_token=` for
    WebSocket clients such as browsers, which cannot set headers)."""

    def __init__(self, tokens: dict[str, Identity] | None, path: Path | None = None) -> None:
        self._tokens = tokens  # None: auth is off
        self._path = path

    def reload(self) -> str:
        """Read the tokens file again (SIGHUP); a broken file keeps the tokens in use."""
        if self._path is None:
            return "auth is off; nothing to reload"
        try:
            self._tokens = load_tokens(self._path)
        except TokenFileError as exc:
            return f"kept the previous tokens: {exc}"
        return f"reloaded {len(self._tokens)} API tokens"

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def identify(self, request: web.Request) -> Identity:
        if self._tokens is None:
            return ANONYMOUS_ADMIN
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            token = request.query.get("access_token", "")
            if not token:
                raise ApiError(401, "Unauthorized", "a bearer token is required "
                               "(Authorization: Bearer <token>)")
        elif scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "the Authorization header must be "
                           "'Bearer <token>'")
        identity = self._tokens.get(_digest(token.strip()))
        if identity is None:
            raise ApiError(401, "Unauthorized", "the bearer token is not valid")
        return identity

    @staticmethod
    def authorize(identity: Identity, needed: str) -> None:
        if not allows(identity, needed):
            raise ApiError(403, "Forbidden", f"role {identity.role} may not do this; "
                           f"it needs role {needed} or higher")
