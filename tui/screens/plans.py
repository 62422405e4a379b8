"""Migration plans: every plan, and the highlighted plan's per-VM status table, as the
Plan objects' properties say (they change with each VM, so the tables follow the bus);
preflight, start and cancel the highlighted plan. Plans are created with
`hyperctl plan create` (their definition is a JSON document)."""
from __future__ import annotations

import json

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable

from hypersdk.client.errors import ClientError
from hypersdk.client.names import PLAN_IFACE, PLANS_PATH

from ..client import ClientEvent
from .base import HyperScreen

PLAN_COLUMNS = ("Name", "Status", "Provider", "VMs", "Moved")
VM_COLUMNS = ("VM", "Host", "Datastore", "State", "Job", "Seconds", "Error")


def _vm_row(line: dict) -> list[str]:
    seconds = line.get("seconds")
    state = line["state"] + (f" ({line['job_status']})" if line.get("job_status") else "")
    return [line["name"], line["host"] or "—", line["datastore"] or "—", state,
            line["job_id"] or "—", f"{seconds:.1f}" if seconds is not None else "—",
            line["error"]]


def preflight_summary(report: dict) -> str:
    """One line for a notification: passed, or the first failing VM and rule."""
    failing = [f"{entry['name'] or entry['vm']}: {check['rule']}: {check['message']}"
               for entry in report["vms"] for check in entry["checks"] if not check["ok"]]
    if report["ok"]:
        return f"preflight passed for {len(report['vms'])} VM(s)"
    return (f"preflight failed ({len(failing)} problem(s)): "
            + (failing[0] if failing else report.get("problem", "")))


class PlansScreen(HyperScreen):
    heading = "Plans"
    BINDINGS = [Binding("p", "preflight", "Preflight"), Binding("x", "start", "Start"),
                Binding("c", "cancel", "Cancel")]

    def compose_body(self) -> ComposeResult:
        yield DataTable(id="plans", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="plan-vms", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        for table_id, columns in (("#plans", PLAN_COLUMNS), ("#plan-vms", VM_COLUMNS)):
            table = self.query_one(table_id, DataTable)
            for column in columns:
                table.add_column(column, key=column)
        self.rebuild()

    def plans(self) -> dict[str, dict]:
        found = self.hyper_app.client.mirror.objects_under(PLANS_PATH)
        return {path: ifaces[PLAN_IFACE] for path, ifaces in found.items()
                if PLAN_IFACE in ifaces}

    def rebuild(self) -> None:
        table = self.query_one("#plans", DataTable)
        selected = self.selected()
        table.clear()
        for path, props in self.plans().items():
            vms = json.loads(props.get("Vms") or "[]")
            table.add_row(props.get("Name", ""), props.get("Status", ""),
                          props.get("Provider", ""), str(len(vms)),
                          str(sum(vm["state"] == "completed" for vm in vms)), key=path)
        if selected in self.plans():
            table.move_cursor(row=table.get_row_index(selected))
        self.show_vms()

    @on(DataTable.RowHighlighted, "#plans")
    def show_vms(self) -> None:
        table = self.query_one("#plan-vms", DataTable)
        table.clear()
        path = self.selected()
        if path is None:
            return
        for line in json.loads(self.plans()[path].get("Vms") or "[]"):
            table.add_row(*_vm_row(line), key=line["vm"])

    def client_event(self, event: ClientEvent) -> None:
        if event.type in ("objects", "service"):
            self.rebuild()

    def selected(self) -> str | None:
        table = self.query_one("#plans", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @work(group="plans")
    async def call(self, member: str) -> None:
        path = self.selected()
        if path is None:
            return
        try:
            answer = await self.hyper_app.client.call_object(path, PLAN_IFACE, member)
        except ClientError as exc:
            self.report(exc)
            return
        name = self.plans().get(path, {}).get("Name", path.rsplit("/", 1)[-1])
        self.notify(preflight_summary(json.loads(answer)) if member == "Preflight"
                    else f"{member}: requested for {name}")

    def action_preflight(self) -> None:
        self.call("Preflight")

    def action_start(self) -> None:
        self.call("Start")

    def action_cancel(self) -> None:
        self.call("Cancel")
