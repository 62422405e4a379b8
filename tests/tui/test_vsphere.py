"""The VMs screen and `hyperctl vms` against the vSphere simulator through hypervisord."""
from __future__ import annotations

import json
import subprocess

import pytest
from textual.widgets import Checkbox, DataTable, RadioButton, Select

from hypersdk.tui.app import HyperctlApp
from hypersdk.tui.client import HyperClient
from tests.vcsim.harness import give_disks

from ..support.cli import run_hyperctl
from .conftest import cell
from ..support.wait import pilot_until

EXPORT_VM = "DC0_H0_VM0"
pytestmark = pytest.mark.slow  # a simulator and a real export per test


@pytest.fixture
def vsphere_daemon(sim, si, service_dir, start_hypervisord):
    work = service_dir / "uploads"
    work.mkdir()
    give_disks(sim, si, EXPORT_VM, [4 << 20, 2 << 20], work)
    return start_hypervisord(providers={"vsphere": sim.provider_settings()})


def test_cli_vms_json_and_table(system_bus, vsphere_daemon):
    result = run_hyperctl(system_bus.address, "vms", "--json")
    assert result.returncode == 0, result.stderr
    vms = {vm["name"]: vm for vm in json.loads(result.stdout)}
    assert EXPORT_VM in vms and vms[EXPORT_VM]["power_state"] == "poweredOff"
    assert len(vms[EXPORT_VM]["disks"]) >= 2 and vms[EXPORT_VM]["provider"] == "vsphere"

    table = run_hyperctl(system_bus.address, "vms", "--provider", "vsphere")
    assert table.returncode == 0
    assert table.stdout.split()[:4] == ["NAME", "POWER", "CPUS", "MEMORY"]
    assert EXPORT_VM in table.stdout

    unknown = run_hyperctl(system_bus.address, "vms", "--provider", "nope")
    assert unknown.returncode == 2 and "--provider: unknown provider 'nope'" in unknown.stderr


async def test_browse_filter_and_migrate_a_vm_with_conversion(system_bus, vsphere_daemon, service_dir):
    app = HyperctlApp(HyperClient(system_bus.address), start_mode="vms")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        table = screen.query_one("#vms", DataTable)
        provider = screen.query_one("#provider", Select)
        await pilot_until(pilot, lambda: ("vsphere", "vsphere") in provider._options,
                       what="the provider list")
        provider.value = "vsphere"
        await pilot_until(pilot, lambda: table.row_count >= 4, what="the VM list")
        total = table.row_count
        names = lambda: [str(table.get_cell_at((row, 1))) for row in range(table.row_count)]  # noqa: E731

        await pilot.press("slash", *"C0_RP0")
        await pilot_until(pilot, lambda: names() and all("C0_RP0" in n for n in names()),
                       what="the name filter")
        await pilot.press(*["backspace"] * 6)
        await pilot_until(pilot, lambda: table.row_count == total, what="the filter cleared")

        screen.query_one("#power", Select).value = "poweredOff"
        await pilot_until(pilot, lambda: names() == [EXPORT_VM], what="the power filter")
        table.focus()
        details = str(screen.query_one("#vm-details").render())
        assert EXPORT_VM in details and "Disks" in details and "NICs" in details

        await pilot.press("space", "m")
        await pilot_until(pilot, lambda: bool(app.screen.query("#plan")), what="the form")
        form = app.screen
        form.query_one("#mode-export", RadioButton).value = True
        form.query_one("#import", Checkbox).value = True  # import without conversion: refused
        await pilot.press("ctrl+r")
        plan = form.query_one("#plan")
        assert "import to KVM: needs a conversion" in str(plan.render())
        assert form.query_one("#submit").disabled

        form.query_one("#mode-direct", RadioButton).value = True
        form.query_one("#import", Checkbox).value = False
        await pilot.press("ctrl+r")
        assert f"export {EXPORT_VM} from vsphere as OVA" in str(plan.render())
        assert "convert the disks to qcow2 with the built-in converter" in str(plan.render())
        await pilot.click("#submit")
        await pilot_until(pilot, lambda: type(app.screen).__name__ == "JobsScreen", what="jobs")
        job_id = next(iter(app.client.mirror.jobs))
        await pilot_until(pilot, lambda: cell(app, job_id, "Status") in ("completed", "failed"),
                       timeout=60, what="the export")
        assert cell(app, job_id, "Status") == "completed", app.client.mirror.jobs[job_id].props
        assert list((service_dir / "exports").rglob("*.ova"))
        converted = list((service_dir / "kvm").rglob("*.qcow2"))
        assert len(converted) == 2, converted
        for image in converted:
            info = subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                  capture_output=True, text=True, check=True).stdout
            assert json.loads(info)["format"] == "qcow2"
