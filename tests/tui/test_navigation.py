"""Bindings, the command palette and the VM table's sort/filter, on fixed data."""
from __future__ import annotations

from textual.command import CommandPalette
from textual.widgets import DataTable

from hypersdk.tui.app import HyperctlApp

from .fake_client import NOW, FakeConsoleClient


def make_app(mode: str = "jobs") -> HyperctlApp:
    return HyperctlApp(FakeConsoleClient(), start_mode=mode, clock=lambda: NOW)


async def test_keys_switch_screens():
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        for key, name in (("v", "VMsScreen"), ("s", "AutomationScreen"), ("j", "JobsScreen"),
                          ("b", "AutomationScreen"), ("w", "AutomationScreen")):
            await pilot.press(key)
            await pilot.pause()
            assert type(app.screen).__name__ == name, key
        assert app.current_mode == "webhooks"
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"


async def test_command_palette_lists_the_actions():
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        titles = [str(title) for title, *_ in
                  [(c.title,) for c in app.get_system_commands(app.screen)]]
        for wanted in ("Show VMs", "Show Jobs", "Show Schedules", "Show Backup policies",
                       "Show Webhooks", "Migrate VMs", "Help"):
            assert wanted in titles
        await pilot.press(*"Show VMs")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert app.current_mode == "vms"


async def test_vm_table_filters_sorts_and_migrates_marked_vms():
    app = make_app("vms")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#vms", DataTable)

        def names() -> list[str]:
            return [str(table.get_cell_at((row, 1))) for row in range(table.row_count)]

        assert names() == ["db01", "mail01", "web01"]
        await pilot.press("o", "o", "o", "o")  # Name -> Power -> CPUs -> Memory -> Disk
        assert names() == ["web01", "mail01", "db01"]
        await pilot.click("#vms", offset=(6, 0))  # a click on the header sorts by Name
        await pilot.pause()
        assert names() == ["db01", "mail01", "web01"]
        app.screen.query_one("#datacenter").value = "DC1"
        await pilot.pause()
        assert names() == ["db01", "web01"]
        await pilot.press("slash", *"web")
        await pilot.pause()
        assert names() == ["web01"]

        table.focus()
        await pilot.press("space", "m")
        await pilot.pause()
        assert type(app.screen).__name__ == "MigrateScreen"
        await pilot.press("ctrl+r")
        await pilot.pause()
        await pilot.click("#submit")
        await pilot.pause(0.3)
        submitted = [call for call in app.client.calls if call[0] == "submit"]
        assert [(d["vm_identifier"], kind) for _, d, kind in submitted] == [("vm-101", "export")]
        assert app.current_mode == "jobs"
