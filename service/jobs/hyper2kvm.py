"""The hyper2kvm daemon as seen from an export job: is its unit running, is its output there.

`unit_state` asks systemd over the system bus (the only D-Bus use in jobs/, as
a plain client of org.freedesktop.systemd1): Manager.GetUnit, or LoadUnit for a
unit systemd has not loaded yet, then the Unit's ActiveState property.
`follow` polls the daemon's workflow directories (hyper2kvm 0.2.1's manifest
workflow daemon: to_be_processed/ → processing/ → processed/ or failed/) for the
manifests a job handed over, and finds the images in `<output_dir>/<date>/<name>/`.
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
QUEUE_DIR = "to_be_processed"  # where the daemon takes manifests from
IMAGE_SUFFIXES = (".qcow2", ".raw", ".img", ".vdi")  # its --out-format choices


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


@dataclass(frozen=True)
class Marker:
    """Where hyper2kvm's manifest workflow daemon has a manifest: queued (still in
    to_be_processed/ or not seen yet), processing, processed or failed; with the file
    that says so and, for a failure, the daemon's error."""
    state: str
    path: Path | None = None
    error: str = ""


def read_marker(base: Path, name: str) -> Marker:
    """The state of manifest `name` in the daemon's directory `base` (blocking).

    0.2.1 moves a manifest it takes from to_be_processed/ to processing/, then to
    processed/<date>/ and writes `<name>.report.json` beside it, or to failed/<date>/
    with `<name>.error.json` ({"error": ...}). A marker still being written counts as
    not there yet."""
    error_file = _dated(base / "failed", f"{name}.error.json")
    if error_file is not None:
        data = _json_object(error_file)
        if data is not None:
            return Marker("failed", error_file,
                          str(data.get("error") or "no error message").strip())
    report = _dated(base / "processed", f"{name}.report.json")
    if report is not None and _json_object(report) is not None:
        return Marker("processed", report)
    if (base / "processing" / name).exists():
        return Marker("processing", base / "processing" / name)
    return Marker("queued", base / QUEUE_DIR / name)


def _dated(directory: Path, name: str) -> Path | None:
    """directory/<date>/name, for whichever date the daemon chose."""
    return next(iter(sorted(directory.glob(f"*/{name}"))), None)


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_image(output_dir: Path, stem: str) -> Path:
    """The image the daemon converted manifest `stem` into: the one disk image in
    `<output_dir>/<date>/<stem>/` (its --to-output name). Blocking."""
    images = [path for path in sorted(output_dir.glob(f"*/{stem}/*"))
              if path.suffix in IMAGE_SUFFIXES and path.is_file()]
    if len(images) != 1:
        found = ", ".join(str(p) for p in images) or "nothing"
        raise Failed(f"hyper2kvm reports {stem} done, but {output_dir}/<date>/{stem}/ holds "
                     f"{found} where one image was expected: hyper2kvm.output_dir must be the "
                     "daemon's --output-dir and it must run with --to-output "
                     "(data/systemd/hyper2kvm@.service)")
    return images[0]


async def follow(base: Path, output_dir: Path, names: list[str], *, poll_interval: float,
                 timeout: float, log: Callable[[str], None],
                 on_done: Callable[[str, Path], None]) -> dict[str, Path]:
    """Follow manifests `names` (in the daemon's directory `base`) until each is
    processed; returns each name's image. Calls on_done(name, image) as each ends.

    Raises Failed with the daemon's own error as soon as one fails, and when
    `timeout` seconds pass first, saying where each unfinished manifest is."""
    deadline = time.monotonic() + timeout
    states = {name: "queued" for name in names}
    images: dict[str, Path] = {}
    log(f"following hyper2kvm in {base} and {output_dir} "
        f"(every {poll_interval:g} s, at most {timeout:g} s)")
    while True:
        for name in [n for n in names if n not in images]:
            marker = await asyncio.to_thread(read_marker, base, name)
            if marker.state == "failed":
                raise Failed(f"hyper2kvm failed on {name}: {marker.error} ({marker.path})")
            if marker.state == "processed":
                images[name] = await asyncio.to_thread(find_image, output_dir,
                                                       name.removesuffix(".json"))
                on_done(name, images[name])
            elif marker.state == "processing" and states[name] == "queued":
                states[name] = "processing"
                log(f"hyper2kvm took {name}")
        if len(images) == len(names):
            return images
        if time.monotonic() >= deadline:
            raise Failed(f"hyper2kvm did not finish within {timeout:g} s "
                         f"(hyper2kvm.job_timeout): " + "; ".join(
                             f"{name} {_WAITING[states[name]]}" for name in names
                             if name not in images))
        await asyncio.sleep(poll_interval)


_WAITING = {"queued": f"still waiting in {QUEUE_DIR}/ (is the daemon running?)",
            "processing": "still being processed"}
