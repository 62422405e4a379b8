"""The console driven by Pilot against a real hypervisord on the private bus."""
from __future__ import annotations

import asyncio
import json

from textual.widgets import DataTable, Log

from hypersdk.client.names import job_path
from hypersdk.tui.app import HyperctlApp
from hypersdk.tui.client import HyperClient

from ..support.cli import BusMonitor, interfaces_removed
from ..support.wait import pilot_until
from .conftest import cell, submit_job


async def test_jobs_table_follows_a_job_live_to_completed(system_bus, hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        job_id = await asyncio.to_thread(submit_job, system_bus.address,
                                         {"steps": 10, "interval": 0.15}, "sleep")
        seen: set[str] = set()

        def observe() -> bool:
            if cell(app, job_id, "Status"):
                seen.add(cell(app, job_id, "Status") + " " + cell(app, job_id, "Progress").split()[-1])
            return cell(app, job_id, "Status") == "completed"

        await pilot_until(pilot, observe, what="the job to complete in the table")
        assert "100%" in cell(app, job_id, "Progress")
        partial = [s for s in seen if s.startswith("running") and not s.endswith(("?", "100%"))]
        assert partial, f"never saw partial progress: {seen}"
        await pilot_until(pilot, lambda: "completed" in str(
            app.screen.query_one("#status-line").render()), what="the counts in the header")


async def test_cancel_a_job_from_the_table(system_bus, hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        keep = await asyncio.to_thread(submit_job, system_bus.address,
                                       {"steps": 3, "interval": 0.05}, "sleep")
        victim = await asyncio.to_thread(submit_job, system_bus.address,
                                         {"steps": 300, "interval": 0.1}, "sleep")
        await pilot_until(pilot, lambda: cell(app, victim, "Status") == "running", what="running")
        table = app.screen.query_one("#jobs", DataTable)
        table.move_cursor(row=table.get_row_index(victim))
        await pilot.press("c")
        await pilot_until(pilot, lambda: cell(app, victim, "Status") == "cancelled", what="cancel")
        await pilot_until(pilot, lambda: cell(app, keep, "Status") == "completed", what="the other")
        assert any("cancel requested" in n.message for n in app._notifications)


async def test_job_view_log_follows_live_and_status_filter(system_bus, hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        job_id = await asyncio.to_thread(submit_job, system_bus.address,
                                         {"steps": 8, "interval": 0.4}, "sleep")
        await pilot_until(pilot, lambda: bool(cell(app, job_id, "Status")), what="the row")
        table = app.screen.query_one("#jobs", DataTable)
        table.move_cursor(row=table.get_row_index(job_id))
        await pilot.press("enter")
        await pilot_until(pilot, lambda: bool(app.screen.query("#job-log")), what="job view")
        log = app.screen.query_one("#job-log", Log)
        await pilot_until(pilot, lambda: "step 1" in "\n".join(log.lines), what="first line")
        assert "step 8" not in "\n".join(log.lines)  # it is following, not replaying
        await pilot_until(pilot, lambda: "step 8" in "\n".join(log.lines), what="last line")
        await pilot_until(pilot, lambda: "completed" in str(
            app.screen.query_one("#job-summary").render()), what="completed summary")
        steps = [line.split()[-1] for line in log.lines if " step " in line]
        assert steps == [str(i) for i in range(1, 9)]

        await pilot.press("escape")
        failed = await asyncio.to_thread(submit_job, system_bus.address, {"message": "x"}, "fail")
        await pilot_until(pilot, lambda: cell(app, failed, "Status") == "failed", what="failed row")
        app.screen.query_one("#status-filter").value = "failed"
        await pilot.pause(0.1)
        rows = app.screen.query_one("#jobs", DataTable).rows
        assert failed in rows and job_id not in rows


async def test_service_restart_shows_the_banner_and_reconnects(system_bus, start_hypervisord):
    daemon = start_hypervisord()
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        job_id = await asyncio.to_thread(submit_job, system_bus.address, {"steps": 1}, "sleep")
        await pilot_until(pilot, lambda: cell(app, job_id, "Status") == "completed", what="job")
        banner = app.screen.query_one("#banner")
        assert not banner.display

        await asyncio.to_thread(daemon.stop)
        await pilot_until(pilot, lambda: banner.display, what="the banner")
        assert "not running" in str(banner.render())
        assert "down" in str(app.screen.query_one("#status-line").render())

        await asyncio.to_thread(start_hypervisord)
        await pilot_until(pilot, lambda: not banner.display, what="the reconnect")
        later = await asyncio.to_thread(submit_job, system_bus.address, {"steps": 1}, "sleep")
        await pilot_until(pilot, lambda: cell(app, later, "Status") == "completed", what="new job")
        assert cell(app, job_id, "Status") == "completed"  # reloaded from the store


async def test_schedules_create_disable_delete(system_bus, hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address), start_mode="schedules")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        screen = app.screen
        await pilot_until(pilot, lambda: not screen.query_one("#automation-note").display,
                       what="the features")
        await pilot.press("n")
        await pilot_until(pilot, lambda: bool(app.screen.query("#definition")), what="dialog")
        editor = app.screen.query_one("#definition")
        editor.load_text("{not json")
        await pilot.click("#create")
        assert "malformed JSON" in str(app.screen.query_one("#create-error").render())
        editor.load_text(json.dumps({"name": "tui-nightly", "cron": "0 2 * * *", "kind": "sleep",
                                     "job_definition": {"steps": 1}}))
        await pilot.press("ctrl+s")

        def row() -> list[str]:
            table = screen.query_one("#objects", DataTable)
            return [str(c) for c in table.get_row_at(0)] if table.row_count else []

        await pilot_until(pilot, lambda: row()[:2] == ["tui-nightly", "yes"], what="the schedule")
        assert "Cron=0 2 * * *" in row()[2]
        await pilot.press("e")
        await pilot_until(pilot, lambda: row()[:2] == ["tui-nightly", "no"], what="disabled")
        await pilot.press("d")
        await pilot_until(pilot, lambda: row() == [], what="deleted")


async def test_unreachable_bus_shows_the_banner(tmp_path):
    app = HyperctlApp(HyperClient(f"unix:path={tmp_path}/no-bus"))
    async with app.run_test(size=(80, 24)) as pilot:
        banner = app.screen.query_one("#banner")
        await pilot_until(pilot, lambda: banner.display and "Cannot reach" in str(banner.render()),
                       what="the banner")
        assert "down" in str(app.screen.query_one("#status-line").render())


async def test_retry_from_the_job_view_follows_the_new_job(system_bus, hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: app.client.mirror.service_up, what="the service")
        failed = await asyncio.to_thread(submit_job, system_bus.address,
                                         {"message": "no space left"}, "fail")
        await pilot_until(pilot, lambda: cell(app, failed, "Status") == "failed", what="failure")
        app.open_job(failed)
        await pilot_until(pilot, lambda: "no space left" in "".join(
            str(node.render()) for node in app.screen.query("#job-summary")), what="job view")
        await pilot.press("r")
        await pilot_until(pilot, lambda: getattr(app.screen, "job_id", failed) != failed,
                       what="the retry's view")
        retry = app.screen.job_id
        await pilot_until(pilot, lambda: app.client.mirror.jobs.get(retry) is not None
                       and app.client.mirror.jobs[retry].get("RetryOf") == failed,
                       what="the retry job")


async def test_jobs_that_left_the_bus_stay_listed_open_and_retry(system_bus, start_hypervisord):
    """daemon.finished_job_linger 0: a job leaves the bus as it ends; the table keeps it, a
    console started afterwards lists it from the store, opens it and retries it."""
    start_hypervisord(daemon={"finished_job_linger": 0})
    with BusMonitor(system_bus.address) as monitor:
        failed = await asyncio.to_thread(submit_job, system_bus.address,
                                         {"message": "no space left"}, "fail")
        await asyncio.to_thread(monitor.wait_for, interfaces_removed(job_path(failed)))
    app = HyperctlApp(HyperClient(system_bus.address))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot_until(pilot, lambda: cell(app, failed, "Status") == "failed",
                       what="the stored job in the table")
        assert failed not in app.client.mirror.jobs
        table = app.screen.query_one("#jobs", DataTable)
        table.move_cursor(row=table.get_row_index(failed))
        await pilot.press("r")
        await pilot_until(pilot, lambda: any(f"{failed} retried as" in n.message
                                          for n in app._notifications), what="the retry")
        retry = next(n.message for n in app._notifications
                     if f"{failed} retried as" in n.message).rsplit(" ", 1)[-1]
        await pilot_until(pilot, lambda: cell(app, retry, "Status") == "failed",
                       what="the retry, kept in the table after it left the bus")
        app.open_job(failed)
        await pilot_until(pilot, lambda: "no space left" in "".join(
            str(node.render()) for node in app.screen.query("#job-summary")), what="job view")
        await pilot_until(pilot, lambda: "no space left" in "\n".join(
            app.screen.query_one("#job-log", Log).lines), what="its stored log")


async def test_webhooks_create_test_delete(system_bus, start_hypervisord):
    start_hypervisord(automation={"webhook_private_targets": ["127.0.0.1:9"]})
    app = HyperctlApp(HyperClient(system_bus.address), start_mode="webhooks")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        await pilot_until(pilot, lambda: not screen.query_one("#automation-note").display,
                       what="the features")
        await pilot.press("n")
        await pilot_until(pilot, lambda: bool(app.screen.query("#definition")), what="dialog")
        app.screen.query_one("#definition").load_text(json.dumps(
            {"url": "http://127.0.0.1:9/hook", "events": ["job.failed"]}))
        await pilot.press("ctrl+s")

        def row() -> list[str]:
            table = screen.query_one("#objects", DataTable)
            return [str(c) for c in table.get_row_at(0)] if table.row_count else []

        await pilot_until(pilot, lambda: row()[:1] == ["http://127.0.0.1:9/hook"], what="webhook")
        assert "Events=job.failed" in row()[2]
        await pilot_until(pilot, lambda: row()[1] == "yes", what="enabled")
        await pilot.press("e")
        await pilot_until(pilot, lambda: row()[1] == "no", what="disabled")
        await pilot.press("x")  # a disabled webhook cannot be tested: the refusal is shown
        await pilot_until(pilot, lambda: any(n.severity == "error" and "is disabled" in n.message
                                          for n in app._notifications), what="the refusal")
        await pilot.press("e")
        await pilot_until(pilot, lambda: row()[1] == "yes", what="enabled again")
        await pilot.press("x")
        await pilot_until(pilot, lambda: any("Test: done" in n.message for n in app._notifications),
                       what="the test delivery queued")
        await pilot.press("d")
        await pilot_until(pilot, lambda: row() == [], what="deleted")


async def test_backup_policy_errors_name_the_field_then_create_run_delete(system_bus,
                                                                         hypervisord):
    app = HyperctlApp(HyperClient(system_bus.address), start_mode="backup_policies")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        await pilot_until(pilot, lambda: not screen.query_one("#automation-note").display,
                       what="the features")

        async def create(definition: dict) -> None:
            await pilot.press("n")
            await pilot_until(pilot, lambda: bool(app.screen.query("#definition")), what="dialog")
            app.screen.query_one("#definition").load_text(json.dumps(definition))
            await pilot.press("ctrl+s")

        await create({"name": "weekly", "provider": "nosuch"})
        await pilot_until(pilot, lambda: any(n.severity == "error" for n in app._notifications),
                       what="the refusal")
        error = next(n for n in app._notifications if n.severity == "error")
        assert "provider" in error.message, error.message

        await create({"name": "weekly", "provider": "ova"})

        def row() -> list[str]:
            table = screen.query_one("#objects", DataTable)
            return [str(c) for c in table.get_row_at(0)] if table.row_count else []

        await pilot_until(pilot, lambda: row()[:2] == ["weekly", "yes"], what="the policy")
        await pilot.press("e")
        await pilot_until(pilot, lambda: row()[1] == "no", what="disabled")
        await pilot.press("x")  # Run works on a disabled policy too
        await pilot_until(pilot, lambda: any("Run: done" in n.message for n in app._notifications),
                       what="the run")
        await pilot.press("d")
        await pilot_until(pilot, lambda: row() == [], what="deleted")
