"""The hyper2kvm daemon as seen from an export job: is its unit running, is its output there.

`unit_state` asks systemd over the system bus (the only D-Bus use in jobs/, as
a plain client of org.freedesktop.systemd1): Manager.GetUnit, or LoadUnit for a
unit systemd has not loaded yet, then the Unit's ActiveState property.
`wait_for_output` polls the converter's output directory for the disk images
named in the manifest until they exist and stop growing, or its report says it failed.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from ..errors import Failed

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
BUS_TIMEOUT = 5.0
_NO_PEER_ERRORS = ("org.freedesktop.DBus.Error.ServiceUnknown",
                   "org.freedesktop.DBus.Error.NameHasNoOwner")
REPORT_NAME = "report.json"  # hyper2kvm's end-of-pipeline report, in its output directory


@dataclass(frozen=True)
class UnitState:
    unit: str
    active_state: str  # active, inactive, failed, activating, ... or "unknown"
    reason: str = ""   # why the state is unknown (no bus, no such unit)

    @property
    def active(self) -> bool:
        return self.active_state == "active"

    def describe(self) -> str:
        return f"{self.unit} is {self.active_state}" + (f" ({self.reason})" if self.reason else "")


def unit_name(instance: str) -> str:
    return f"hyper2kvm@{instance}.service"


async def unit_state(instance: str, bus_address: str | None = None) -> UnitState:
    """ActiveState of hyper2kvm@<instance>.service; never raises for an absent bus or unit.

    The bus is DBUS_SYSTEM_BUS_ADDRESS (or the standard system socket) unless
    `bus_address` is given.
    """
    unit = unit_name(instance)
    try:
        bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
        await asyncio.wait_for(bus.connect(), BUS_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - whatever the cause, there is no bus to ask
        return UnitState(unit, "unknown", f"cannot reach systemd on the system bus: {exc}")
    try:
        return await asyncio.wait_for(_ask_systemd(bus, unit), BUS_TIMEOUT)
    except asyncio.TimeoutError:
        return UnitState(unit, "unknown", "systemd did not answer within "
                         f"{BUS_TIMEOUT:g} s")
    finally:
        bus.disconnect()


async def _ask_systemd(bus, unit: str) -> UnitState:
    reply = await _call(bus, SYSTEMD_PATH, MANAGER_IFACE, "GetUnit", "s", [unit])
    if reply.message_type == MessageType.ERROR and reply.error_name in _NO_PEER_ERRORS:
        return UnitState(unit, "unknown", f"systemd is not on the system bus ({reply.error_name})")
    if reply.message_type == MessageType.ERROR:
        # GetUnit only knows loaded units; LoadUnit loads its file (real systemd).
        reply = await _call(bus, SYSTEMD_PATH, MANAGER_IFACE, "LoadUnit", "s", [unit])
    if reply.message_type == MessageType.ERROR:
        return UnitState(unit, "unknown", f"systemd does not know the unit: {_error_text(reply)}")
    unit_path = reply.body[0]
    reply = await _call(bus, unit_path, PROPERTIES_IFACE, "Get", "ss", [UNIT_IFACE, "ActiveState"])
    if reply.message_type == MessageType.ERROR:
        return UnitState(unit, "unknown", f"cannot read ActiveState: {_error_text(reply)}")
    return UnitState(unit, str(reply.body[0].value))


def _error_text(reply: Message) -> str:
    """The error's name and the last line of its message (a peer may send a traceback)."""
    lines = str(reply.body[0]).strip().splitlines() if reply.body else []
    return f"{reply.error_name}: {lines[-1][:200]}" if lines else str(reply.error_name)


async def _call(bus, path: str, interface: str, member: str, signature: str, body: list):
    return await bus.call(Message(destination=SYSTEMD_BUS_NAME, path=path, interface=interface,
                                  member=member, signature=signature, body=body))


async def wait_for_output(expected: list[Path], *, poll_interval: float, timeout: float,
                          since: float, log: Callable[[str], None] | None = None) -> list[Path]:
    """Wait until every path in `expected` exists with the same size on two polls in a row.

    hyper2kvm writes `report.json` beside its output when its pipeline ends; one
    written after `since` (a time.time() value) that reports a failure ends the wait
    at once with hyper2kvm's own error. Raises Failed naming the missing files when
    `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    report = expected[0].parent / REPORT_NAME
    previous: dict[Path, int] | None = None
    if log is not None:
        log(f"waiting for hyper2kvm output in {expected[0].parent} "
            f"(every {poll_interval:g} s, at most {timeout:g} s)")
    while True:
        sizes = {path: path.stat().st_size for path in expected if path.is_file()}
        if len(sizes) == len(expected) and sizes == previous:
            return list(expected)
        previous = sizes
        failure = reported_failure(report, since)
        if failure:
            raise Failed(f"hyper2kvm failed ({report}): {failure}")
        if time.monotonic() >= deadline:
            missing = [str(p) for p in expected if p not in sizes]
            what = ("missing: " + ", ".join(missing)) if missing else "files still growing"
            raise Failed(f"hyper2kvm produced no finished output within {timeout:g} s "
                         f"(hyper2kvm.job_timeout); {what}")
        await asyncio.sleep(poll_interval)


def reported_failure(report: Path, since: float) -> str | None:
    """The error in hyper2kvm's report.json when it is newer than `since` and says the
    pipeline failed; None otherwise (absent, older, half-written, or a success)."""
    try:
        if report.stat().st_mtime < since:
            return None
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pipeline"), dict):
        return None
    if data["pipeline"].get("success") is not False:
        return None
    errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
    if not errors:
        return "its report says the pipeline failed, without an error message"
    last = errors[-1]
    return f"stage {last.get('stage', '?')}: {last.get('message', '')}"
