"""Fixtures for hyperctl: run the real CLI against the private bus; wait on jobs."""
from __future__ import annotations

import json

import pytest
from textual.widgets import DataTable

from hypersdk.client.names import job_id_from_path, job_path
from hypersdk.tui.app import HyperctlApp

from ..support.cli import run_hyperctl, submit, wait_for_status


def submit_job(address: str, definition: dict, kind: str) -> str:
    """Submit with busctl; returns the job id."""
    return job_id_from_path(json.loads(submit(address, definition, kind=kind).stdout.split()[1]))


def wait_status(address: str, job_id: str, wanted: set[str], timeout: float = 20) -> str:
    """Wait until the job (by id) has one of the `wanted` statuses."""
    return wait_for_status(address, job_path(job_id), wanted, timeout)


@pytest.fixture
def hyperctl(system_bus):
    def run(*args: str, stdin: str | None = None, timeout: float = 60):
        return run_hyperctl(system_bus.address, *args, stdin=stdin, timeout=timeout)
    return run


def cell(app: HyperctlApp, job_id: str, column: str) -> str:
    """The jobs table's cell of `job_id` in `column` ("" while the job is not listed)."""
    tables = app.screen.query("#jobs").results(DataTable)
    table = next(tables, None)
    if table is None or job_id not in table.rows:
        return ""
    return str(table.get_cell(job_id, column))
