"""Fixtures for hyperctl: run the real CLI against the private bus; wait on jobs."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ..support.cli import job_property, submit

HYPERCTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hyperctl"


def run_hyperctl(address: str, *args: str, stdin: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    return subprocess.run([str(HYPERCTL), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def submit_job(address: str, definition: dict, kind: str) -> str:
    """Submit with busctl; returns the job id."""
    path = json.loads(submit(address, definition, kind=kind).stdout.split()[1])
    return path.rsplit("/", 1)[-1].replace("_", "-")


def job_path_of(job_id: str) -> str:
    return "/org/hypersdk/HyperSDK1/jobs/" + job_id.replace("-", "_")


def wait_status(address: str, job_id: str, wanted: set[str], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = job_property(address, job_path_of(job_id), "Status")
        if status in wanted:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{job_id} stayed {status}, wanted {wanted}")


@pytest.fixture
def hyperctl(system_bus):
    def run(*args: str, stdin: str | None = None, timeout: float = 60):
        return run_hyperctl(system_bus.address, *args, stdin=stdin, timeout=timeout)
    return run


from ..vsphere.conftest import si, sim, vcsim_binary  # noqa: E402,F401 - the simulator fixtures
