"""Boot verification: a migration is verified when the guest came up on KVM.

After the domain is started, two signs of a booted guest are watched until the
timeout: the expected text (by default the getty's "login:") on the serial console,
which the domain logs to a file beside its disk (domain_xml.serial_log_beside) or, on
a target host whose files are not reachable from here, read through libvirt's console
stream (virDomainOpenConsole; the domain is started paused until the stream is open, so
nothing it prints is missed), and
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
from typing import TYPE_CHECKING, Any, Callable

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
CONSOLE_KEPT = 1 << 20
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
    return _clean(raw)


def _clean(raw: bytes) -> str:
    return _ESCAPES_RE.sub("", raw.decode("utf-8", "replace").replace("\r", ""))


class ConsoleStream:
    """A domain's serial console through a libvirt stream, read without blocking: what
    libvirt's client received comes in while the connection is used (the watch asks
    for the domain's state twice a second). The last CONSOLE_KEPT bytes are kept."""

    def __init__(self, conn, domain) -> None:
        import libvirt

        self._stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        domain.openConsole(None, self._stream, 0)
        self._raw = bytearray()
        self._open = True

    def text(self) -> str:
        """The console so far (blocking: call in a thread)."""
        import libvirt

        while self._open:
            try:
                chunk = self._stream.recv(65536)
            except libvirt.libvirtError:
                chunk = b""  # the domain stopped: the stream ended with an error
            if chunk == -2:
                break  # nothing more for now
            if not chunk:
                self._open = False
            self._raw += chunk
        del self._raw[:-CONSOLE_KEPT]
        return _clean(bytes(self._raw))

    def close(self) -> None:
        import libvirt

        try:
            self._stream.abort()
        except libvirt.libvirtError:
            pass  # already ended


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
        verification = await _watch(ctx.log, domain, lambda: console_text(serial_log), check)
    finally:
        conn.close()
    return _logged(ctx, verification)


async def start_and_verify_boot(ctx: "JobContext", uri: str, domain_name: str,
                                check: BootCheck) -> dict:
    """Start the defined domain `domain_name` at `uri` and watch its console stream until
    it shows it booted, as verify_boot does with a console log file."""
    ctx.set_stage(STAGE)
    ctx.log(f"verifying the boot: waiting up to {check.timeout:g} s for {check.expect!r} on "
            "the serial console (libvirt's console stream) or an answer from the guest agent")
    conn = await asyncio.to_thread(connect, uri)
    try:
        domain = await asyncio.to_thread(conn.lookupByName, domain_name)
        console = await asyncio.to_thread(_start_with_console, conn, domain, uri)
        try:
            verification = await _watch(ctx.log, domain, console.text, check)
        finally:
            await asyncio.to_thread(console.close)
    finally:
        conn.close()
    return _logged(ctx, verification)


def _start_with_console(conn, domain, uri: str) -> ConsoleStream:
    """Start `domain` paused, open its console, then let it run (blocking)."""
    import libvirt

    try:
        domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        console = ConsoleStream(conn, domain)
        domain.resume()
    except libvirt.libvirtError as exc:
        raise Failed(f"libvirt at {uri} could not start domain {domain.name()!r} with its "
                     f"console: {exc.get_error_message()}") from exc
    return console


def _logged(ctx: "JobContext", verification: dict) -> dict:
    how = (f"{verification['expected']!r} on the serial console"
           if verification["method"] == "console" else "the guest agent answered")
    ctx.log(f"boot verified after {verification['after_seconds']:g} s: {how}")
    return verification


async def _watch(log, domain, read_console: Callable[[], str], check: BootCheck) -> dict:
    started = time.monotonic()
    while True:
        text = await asyncio.to_thread(read_console)
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
