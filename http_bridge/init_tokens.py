"""`hypersdk-bridge --init-tokens`: the first admin token, made once, at install or first start.

Run as root (`make install`, `ExecStartPre=+` of hypersdk-bridge.service). When
`api.tokens_file` does not exist, it is created with one admin token named "admin",
stored as its digest (`sha256:<hex>`), mode 0640, group of `api.bridge_user` so that
the bridge can read it; the token itself goes to `admin.token` beside it, mode 0600,
readable by root only (to put into a client: `~/.curlrc`, a script's environment).
An existing tokens file is never touched.
"""
from __future__ import annotations

import grp
import os
import pwd
import secrets
from pathlib import Path

import yaml

from .auth import token_digest

ADMIN_TOKEN_NAME = "admin.token"
HEADER = """\
# hypersdk-bridge API tokens: <key>: {name: <who>, role: viewer|operator|admin}.
# A key is sha256:<hex SHA-256 of the token> (printf %s TOKEN | sha256sum) or the token
# itself. Apply changes with: systemctl reload hypersdk-bridge
"""


class InitTokensError(Exception):
    """The tokens file cannot be made; the message names the setting."""


def _bridge_group(bridge_user: str) -> int:
    try:
        return pwd.getpwnam(bridge_user).pw_gid
    except KeyError:
        raise InitTokensError(f"api.bridge_user: no user {bridge_user!r} on this system "
                              "(systemd-sysusers creates it from hypersdk.conf)") from None


def _write_new(path: Path, text: str, mode: int, gid: int) -> bool:
    """Write `path` whole or not at all; False if it already exists (never replaced)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink()
    return True


def init_tokens(tokens_file: Path, bridge_user: str) -> str:
    """Create the tokens file and the admin token if missing; a line saying what happened."""
    if tokens_file.exists() or tokens_file.is_symlink():
        return f"{tokens_file} exists; left as it is"
    gid = _bridge_group(bridge_user)
    token = secrets.token_urlsafe(32)
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    admin_file = tokens_file.with_name(ADMIN_TOKEN_NAME)
    entry = {token_digest(token): {"name": "admin", "role": "admin"}}
    try:
        if not _write_new(tokens_file, HEADER + yaml.safe_dump(entry), 0o640, gid):
            return f"{tokens_file} exists; left as it is"
        admin_file.unlink(missing_ok=True)  # a token of an earlier tokens file: stale
        _write_new(admin_file, token + "\n", 0o600, 0)
    except OSError as exc:
        raise InitTokensError(f"api.tokens_file: cannot create {tokens_file} "
                              f"({exc.strerror or exc})") from None
    group = grp.getgrgid(gid).gr_name
    return (f"created {tokens_file} (0640 root:{group}) with the admin token kept in "
            f"{admin_file} (0600 root)")
