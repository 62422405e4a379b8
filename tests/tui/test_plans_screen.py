"""The console's Plans screen on fixed data: the plans, the highlighted plan's VM table
following the bus, and Start/Cancel/Preflight calls on the highlighted plan."""
from __future__ import annotations

import json

from textual.widgets import DataTable

from hypersdk.client.names import PLAN_IFACE, plan_path
from hypersdk.tui.app import HyperctlApp
from hypersdk.tui.client import ClientEvent
from hypersdk.tui.screens.plans import preflight_summary

from .fake_client import NOW, FakeConsoleClient

PATH = plan_path("plan-0a1b")
LINES = [{"vm": "vm-1", "name": "web01", "host": "esx1", "datastore": "ds1",
          "state": "completed", "job_id": "job-1", "seconds": 71.25, "error": ""},
         {"vm": "vm-2", "name": "db01", "host": "esx2", "datastore": "", "state": "released",
          "job_id": "job-2", "job_status": "running", "seconds": None, "error": ""}]


def rows(table: DataTable) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(row)] for row in range(table.row_count)]


async def test_plans_and_the_vm_table_follow_the_bus_and_actions_call_the_plan():
    client = FakeConsoleClient()
    client.mirror.objects[PATH] = {PLAN_IFACE: {
        "Id": "plan-0a1b", "Name": "weekend", "Status": "running", "Provider": "vsphere",
        "Vms": json.dumps(LINES)}}
    app = HyperctlApp(client, start_mode="plans", clock=lambda: NOW)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        plans = app.screen.query_one("#plans", DataTable)
        vms = app.screen.query_one("#plan-vms", DataTable)
        assert rows(plans) == [["weekend", "running", "vsphere", "2", "1"]]
        assert rows(vms) == [["web01", "esx1", "ds1", "completed", "job-1", "71.2", ""],
                             ["db01", "esx2", "—", "released (running)", "job-2", "—", ""]]

        props = client.mirror.objects[PATH][PLAN_IFACE]
        props["Vms"] = json.dumps([LINES[0], {**LINES[1], "state": "failed",
                                              "error": "disk full", "job_status": None}])
        props["Status"] = "failed"
        client.emit(ClientEvent("objects"))
        await pilot.pause()
        assert rows(plans)[0][1] == "failed"
        assert rows(vms)[1][3:] == ["failed", "job-2", "—", "disk full"]

        client.answers["Preflight"] = json.dumps({"ok": True, "vms": [
            {"vm": "vm-1", "name": "web01", "ok": True, "checks": []}]})
        await pilot.press("x", "c", "p")
        await pilot.pause()
        assert [call[3] for call in client.calls if call[0] == "call_object"] == [
            "Start", "Cancel", "Preflight"]
        assert {call[1] for call in client.calls if call[0] == "call_object"} == {PATH}


def test_a_preflight_is_told_in_one_line():
    failing = {"ok": False, "vms": [
        {"vm": "vm-1", "name": "web01", "ok": True, "checks": [{"rule": "found", "ok": True,
                                                                 "message": ""}]},
        {"vm": "vm-2", "name": "", "ok": False, "checks": [
            {"rule": "found", "ok": False, "message": "no VM 'vm-2'"}]}]}
    assert preflight_summary(failing) == \
        "preflight failed (1 problem(s)): vm-2: found: no VM 'vm-2'"
    assert preflight_summary({"ok": True, "vms": failing["vms"][:1]}) == \
        "preflight passed for 1 VM(s)"
    assert preflight_summary({"ok": False, "vms": [], "problem": "no VM matches"}) == \
        "preflight failed (0 problem(s)): no VM matches"
