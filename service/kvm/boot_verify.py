"""Boot verification: a migration is verified when the guest came up on KVM.

After the domain is started, two signs of a booted guest are watched until the
timeout: the expected text (by default the getty's "login:") on the serial console,
which the domain logs to a file beside its disk (domain_xml.serial_log_beside), and
the QEMU guest agent, when the guest runs one (its channel turns connected and it
tells libvirt the guest's time: libvirt's own agent call, which unlike a raw
agent command does not mark the domain "tainted"). Whichever comes first verifies the boot; a domain that stops,
or a timeout, fails it with the console's last lines.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from ..config_schema import parse_duration
from ..errors import Failed, InvalidArgument
from .domain_xml import GUEST_AGENT_CHANNEL
from .libvirt_import import connect

if TYPE_CHECKING:
    from ..job_kinds import JobContext

STAGE = "verify boot"
DEFAULT_EXPECT = "login:"
DEFAULT_TIMEOUT = 600.0
POLL_INTERVAL = 0.5
SHOWN_LINES = 8
_FIELDS = ("timeout", "expect")
_ESCAPES_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class BootCheck:
    """How to tell the guest booted: the text to see on its console, within `timeout` s."""

    timeout: float = DEFAULT_TIMEOUT
    expect: str = DEFAULT_EXPECT

    def to_dict(self) -> dict:
        return {"timeout": self.timeout, "expect": self.expect}


def parse_verify_boot(value: Any, field: str) -> dict | None:
    """A request's `verify_boot`: false, true (the defaults) or {timeout, expect};
    the normalised {timeout, expect}, or None when not asked for."""
    if value is False or value is None:
        return None
    if value is True:
        return BootCheck().to_dict()
    if not isinstance(value, dict):
        raise InvalidArgument(field, "true, false or an object with timeout and expect")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise InvalidArgument(f"{field}.{unknown[0]}", "unknown field (known: timeout, expect)")
    check = BootCheck()
    timeout, expect = value.get("timeout", check.timeout), value.get("expect", check.expect)
    try:
        timeout = parse_duration(timeout)
    except ValueError:
        timeout = 0
    if timeout <= 0:
        raise InvalidArgument(f"{field}.timeout", "a duration > 0 such as 90s or 10m")
    if not isinstance(expect, str) or not expect.strip():
        raise InvalidArgument(f"{field}.expect", "a non-empty string to see on the console")
    return BootCheck(timeout, expect).to_dict()


def console_text(serial_log: Path) -> str:
    """The serial console so far, without terminal escapes and carriage returns."""
    try:
        raw = serial_log.read_bytes()
    except FileNotFoundError:
        return ""
    return _ESCAPES_RE.sub("", raw.decode("utf-8", "replace").replace("\r", ""))


def last_lines(text: str, count: int = SHOWN_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-count:]


async def verify_boot(ctx: "JobContext", uri: str, domain_name: str, serial_log: Path,
                      check: BootCheck) -> dict:
    """Watch the running domain `domain_name` at `uri` until it shows it booted; the
    result's `verification`. Raise Failed otherwise."""
    ctx.set_stage(STAGE)
    ctx.log(f"verifying the boot: waiting up to {check.timeout:g} s for {check.expect!r} on "
            f"the serial console ({serial_log}) or an answer from the guest agent")
    conn = await asyncio.to_thread(connect, uri)
    try:
        domain = await asyncio.to_thread(conn.lookupByName, domain_name)
        verification = await _watch(ctx.log, domain, serial_log, check)
    finally:
        conn.close()
    how = (f"{check.expect!r} on the serial console" if verification["method"] == "console"
           else "the guest agent answered")
    ctx.log(f"boot verified after {verification['after_seconds']:g} s: {how}")
    return verification


async def _watch(log, domain, serial_log: Path, check: BootCheck) -> dict:
    started = time.monotonic()
    while True:
        text = console_text(serial_log)
        method = "console" if check.expect in text else ""
        if not method:
            active, agent = await asyncio.to_thread(_domain_state, domain)
            if not active:
                _fail(log, text, "the domain stopped before it booted")
            method = "guest-agent" if agent else ""
        elapsed = time.monotonic() - started
        if method:
            return _verified(method, elapsed, check, text)
        if elapsed > check.timeout:
            _fail(log, text, f"the guest did not show {check.expect!r} on its serial console "
                             f"within {check.timeout:g} s, nor did a guest agent answer")
        await asyncio.sleep(POLL_INTERVAL)


def _verified(method: str, elapsed: float, check: BootCheck, text: str) -> dict:
    seen = text[:text.index(check.expect) + len(check.expect)] if method == "console" else text
    return {"verified": True, "method": method,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "after_seconds": round(elapsed, 1),
            "expected": check.expect if method == "console" else "the guest agent answered",
            "seen": last_lines(seen)}


def _fail(log, text: str, why: str) -> None:
    lines = last_lines(text)
    log(f"boot not verified: {why}; the console's last lines:" if lines
        else f"boot not verified: {why}; the console stayed empty", "error")
    for line in lines:
        log(f"console: {line}", "error")
    raise Failed(f"boot not verified: {why}"
                 + (f" (last console line: {lines[-1]!r})" if lines else " (empty console)"))


def _domain_state(domain) -> tuple[bool, bool]:
    """(running, the guest agent answered) for a libvirt domain (blocking)."""
    import libvirt

    try:
        if not domain.isActive():
            return False, False
        xml = etree.fromstring(domain.XMLDesc().encode())
    except libvirt.libvirtError:
        return False, False
    state = xml.xpath(f"devices/channel/target[@name='{GUEST_AGENT_CHANNEL}']/@state")
    if state != ["connected"]:
        return True, False
    try:
        domain.getTime()
    except libvirt.libvirtError:
        return True, False
    return True, True
