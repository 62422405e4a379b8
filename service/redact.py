"""One rule for showing URLs and headers that may carry secrets: what is hidden and how.

A URL is shown without its password, without the values of query parameters whose
names look secret (`sig`, `code`, `token`, `X-Amz-Signature`, `key`, ...), and
without path segments that look like tokens (Slack-style
`/services/T000/B000/<token>`, Discord's `/webhooks/<id>/<token>`, UUIDs): a
segment of 16 or more token characters with a digit or a capital letter in it. Plain
words (`hypersdk-events`) and file names (`disk-0.vmdk`) stay readable.
Used wherever a URL is shown: D-Bus properties, REST answers, the console, logs.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"
_SECRET_NAME_RE = re.compile(
    r"auth|token|secret|key|pass|cookie|session|sig|code|credential", re.IGNORECASE)
_SECRET_VALUE_RE = re.compile(r"^\s*(bearer|basic|digest|token|negotiate)\s", re.IGNORECASE)
_TOKEN_SEGMENT_RE = re.compile(r"^(?=.*[0-9A-Z])[A-Za-z0-9_-]{16,}$")


def looks_secret(name: str, value: str) -> bool:
    """A header or query parameter whose name or value suggests a credential."""
    return bool(_SECRET_NAME_RE.search(name) or _SECRET_VALUE_RE.match(value))


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if looks_secret(k, v) else v for k, v in headers.items()}


def _netloc(parts) -> str:
    netloc = parts.netloc
    if "@" not in netloc:
        return netloc
    userinfo, host = netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{user}@{host}"


def redact_url(url: str) -> str:
    """`url` as it may be shown to anyone; see the module docstring for the rule."""
    parts = urlsplit(url)
    path = "/".join(REDACTED if _TOKEN_SEGMENT_RE.match(segment) else segment
                    for segment in parts.path.split("/"))
    query = urlencode([(k, REDACTED if looks_secret(k, v) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="<>")
    return urlunsplit((parts.scheme, _netloc(parts), path, query, ""))
