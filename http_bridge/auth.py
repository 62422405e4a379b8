"""Bearer tokens with roles, read from `api.tokens_file`.

The file is YAML mapping each token to `{name, role}`. A key is the token itself or,
better, `sha256:<hex SHA-256 of the token>` (what `hypersdk-bridge --init-tokens`
writes), so the file read by this network-facing process holds no usable
credential. It must not be readable by others nor writable by the group (mode 0600
or 0640). Roles are ordered: viewer < operator < admin; every route names the least
role it needs (`Route.role` in app.py). With `api.auth: none` (allowed only on a
loopback address) every caller is the admin "anonymous".

A token travels in `Authorization: Bearer <token>`; only the WebSocket route also
takes `?access_token=`, because browsers cannot set headers there.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web

from hypersdk.service.principals import REST_NAME_RULE, ROLES, is_rest_name, role_at_least

from .errors import ApiError

PUBLIC = "public"


DIGEST_PREFIX = "sha256:"
_DIGEST_KEY_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    credential: str = field(default="", compare=False)  # the token's digest; "" if none


ANONYMOUS_ADMIN = Identity("anonymous", "admin")


class TokenFileError(Exception):
    """The tokens file cannot be used; the message names the file and the rule."""


def token_digest(token: str) -> str:
    """The form a token is kept in: `sha256:<hex>`."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _key_digest(key: object) -> str | None:
    """A tokens-file key as a digest: a stored digest as it is, a raw token hashed."""
    if isinstance(key, str) and _DIGEST_KEY_RE.fullmatch(key):
        return key
    if isinstance(key, str) and len(key) >= 16:
        return token_digest(key)
    return None


def load_tokens(path: Path) -> dict[str, Identity]:
    """Read the tokens file -> {digest: Identity}; only digests stay in memory."""
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
        digest = _key_digest(token)
        if digest is None:
            raise TokenFileError(f"{where}: expected a token of at least 16 characters "
                                 "or sha256:<64 hex digits>")
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TokenFileError(f"{where}: expected {{name: <string>, role: <role>}}")
        if not is_rest_name(entry["name"]):
            raise TokenFileError(f"{where}: name expected {REST_NAME_RULE} (hypervisord "
                                 "records it as rest:<name>)")
        if entry.get("role") not in ROLES:
            raise TokenFileError(f"{where}: role expected one of {', '.join(ROLES)}")
        tokens[digest] = Identity(entry["name"], entry["role"], digest)
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allows(identity: Identity, needed: str) -> bool:
    return needed == PUBLIC or role_at_least(identity.role, needed)


class Authenticator:
    """Who is calling: from `Authorization: Bearer <token>` (or `?access_token=` where
    the route allows it: the WebSocket, for browsers)."""

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

    def still_valid(self, identity: Identity) -> bool:
        """Is `identity` still what its token grants (after a reload)?"""
        return self._tokens is None or self._tokens.get(identity.credential) == identity

    def identify(self, request: web.Request, token_in_url: bool = False) -> Identity:
        """The caller; `token_in_url`: the route takes `?access_token=` (guard.py refuses
        it everywhere else)."""
        if self._tokens is None:
            return ANONYMOUS_ADMIN
        token = _presented_token(request, token_in_url)
        identity = self._tokens.get(token_digest(token))
        if identity is None:
            raise ApiError(401, "Unauthorized", "the bearer token is not valid")
        return identity

    @staticmethod
    def authorize(identity: Identity, needed: str) -> None:
        if not allows(identity, needed):
            raise ApiError(403, "Forbidden", f"role {identity.role} may not do this; "
                           f"it needs role {needed} or higher")


def _presented_token(request: web.Request, token_in_url: bool) -> str:
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise ApiError(401, "Unauthorized", "send exactly one Authorization header")
    if not headers:
        token = request.query.get("access_token", "") if token_in_url else ""
        if not token:
            raise ApiError(401, "Unauthorized", "a bearer token is required "
                           "(Authorization: Bearer <token>)")
        return token
    scheme, _, token = headers[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Unauthorized", "the Authorization header must be "
                       "'Bearer <token>'")
    return token.strip()
