"""Drive the service the way users do: busctl and gdbus, optionally as another user."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

from hypersdk.client.names import BUS_NAME, JOB_IFACE, MANAGER_IFACE
from hypersdk.client.names import MANAGER_PATH as MANAGER

from .wait import wait_for_value

HYPERCTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hyperctl"


def run_hyperctl(address: str, *args: str, stdin: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
    """The real hyperctl as a script runs it, on the bus at `address`."""
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    return subprocess.run([str(HYPERCTL), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def busctl(address: str, *args: str, user: str | None = None,
           check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    command = ["busctl", f"--address={address}", *args]
    if user:
        command = ["runuser", "-u", user, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed: {result.stderr}")
    return result


def busctl_json(address: str, *args: str, user: str | None = None) -> dict:
    """`busctl --json=short call ...` parsed: {"type": ..., "data": [...]}."""
    return json.loads(busctl(address, "--json=short", *args, user=user).stdout)


def submit(address: str, definition: dict, kind: str = "export", user: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    return busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                  json.dumps(definition), "1", "kind", "s", kind, user=user, check=check)


def job_property(address: str, path: str, name: str, user: str | None = None):
    reply = busctl_json(address, "get-property", BUS_NAME, path, JOB_IFACE, name, user=user)
    return reply["data"]


def wait_for_status(address: str, path: str, wanted: set[str], timeout: float = 20) -> str:
    """Wait until the job's Status is one of `wanted`; returns it."""
    return wait_for_value(lambda: job_property(address, path, "Status"),
                          lambda status: status in wanted, timeout,
                          f"{path} to be one of {sorted(wanted)}")


def gdbus_call(address: str, path: str, method: str, *args: str,
               user: str | None = None) -> subprocess.CompletedProcess:
    command = ["gdbus", "call", "--address", address, "--dest", BUS_NAME,
               "--object-path", path, "--method", method, *args]
    if user:
        command = ["runuser", "-u", user, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def gvariant_string(text: str) -> str:
    """Quote text as a GVariant string literal for gdbus."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def gdbus_submit(address: str, definition: dict, kind: str = "export",
                 user: str | None = None) -> subprocess.CompletedProcess:
    return gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.SubmitJob",
                      gvariant_string(json.dumps(definition)), f"{{'kind': <'{kind}'>}}",
                      user=user)


def interfaces_removed(path: str) -> str:
    """How `gdbus monitor` shows the object at `path` leaving the bus (BusMonitor.wait_for)."""
    return f"InterfacesRemoved (objectpath '{path}'"


class BusMonitor:
    """`gdbus monitor` of hypervisord's signals (as `user`), started subscribed: entering
    waits for its "Monitoring signals" line, so nothing emitted afterwards is missed.
    A thread collects the lines; `wait_for` waits on them instead of sleeping."""

    def __init__(self, address: str, user: str | None = None) -> None:
        command = ["gdbus", "monitor", "--address", address, "--dest", BUS_NAME]
        self._command = ["runuser", "-u", user, "--", *command] if user else command
        self._lines: list[str] = []
        self._changed = threading.Condition()

    def __enter__(self) -> "BusMonitor":
        self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("Monitoring signals")
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 20) -> None:
        self.wait_for_line(text, timeout=timeout)

    def wait_for_line(self, *parts: str, timeout: float = 20) -> str:
        """The first line (one signal) holding every one of `parts`, once there is one."""
        def found() -> str:
            return next((line for line in self._lines if all(p in line for p in parts)), "")

        with self._changed:
            if not self._changed.wait_for(found, timeout):
                raise AssertionError(f"gdbus monitor never showed {parts!r} in one line:\n"
                                     + self.text[-4000:])
            return found()

    @property
    def text(self) -> str:
        return "".join(self._lines)

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        self._reader.join(timeout=10)
