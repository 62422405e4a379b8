"""Snapshots of the main screens at 120x40 and 80x24, from fixed data and a fixed clock."""
from __future__ import annotations

import time

import pytest

from hypersdk.tui.app import HyperctlApp

from .fake_client import NOW, FakeConsoleClient

SIZES = [pytest.param((120, 40), id="120x40"), pytest.param((80, 24), id="80x24")]


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Log times are shown in local time; pin the zone so every machine draws the same."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make_app(mode: str = "jobs") -> HyperctlApp:
    return HyperctlApp(FakeConsoleClient(), start_mode=mode, clock=lambda: NOW)


@pytest.mark.parametrize("size", SIZES)
def test_jobs_screen(snap_compare, size):
    assert snap_compare(make_app(), terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_vms_screen(snap_compare, size):
    async def select_second(pilot):
        await pilot.pause()
        await pilot.press("down")

    assert snap_compare(make_app("vms"), terminal_size=size, run_before=select_second)


@pytest.mark.parametrize("size", SIZES)
def test_job_view(snap_compare, size):
    async def open_running_job(pilot):
        pilot.app.open_job("job-0002")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=open_running_job)


@pytest.mark.parametrize("size", SIZES)
def test_migrate_plan(snap_compare, size):
    async def review(pilot):
        await pilot.pause()
        await pilot.press("space", "space", "m")
        await pilot.pause()
        await pilot.press("ctrl+r")
        await pilot.pause()
        pilot.app.screen.query_one("#plan").scroll_visible(animate=False)
        await pilot.pause()

    assert snap_compare(make_app("vms"), terminal_size=size, run_before=review)


def test_help(snap_compare):
    async def press_help(pilot):
        await pilot.press("question_mark")

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=press_help)
