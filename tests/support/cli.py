"""Drive the service the way users do: busctl and gdbus, optionally as another user."""
from __future__ import annotations

import json
import subprocess
import time

BUS_NAME = "org.hypersdk.HyperSDK1"
MANAGER = "/org/hypersdk/HyperSDK1/Manager"
MANAGER_IFACE = "org.hypersdk.HyperSDK1.Manager"
JOB_IFACE = "org.hypersdk.HyperSDK1.Job"


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
    """Poll the job's Status until it is one of `wanted`."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = job_property(address, path, "Status")
        if status in wanted:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{path} stayed {status}, wanted {wanted}")


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
