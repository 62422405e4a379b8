"""Schedules, backup policies and webhooks: list, create, enable/disable, delete.

The objects come from the ObjectManager like jobs do (`Mirror.objects`), under
`/org/hypersdk/HyperSDK1/<kind>/`. Creation goes through the Manager's Create*
method with a JSON definition typed into an editor.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Static, TextArea

from hypersdk.client.errors import ClientError
from hypersdk.client.names import BACKUP_POLICIES, SCHEDULES, WEBHOOKS, AutomationKind

from ..client import ClientEvent
from .base import HyperScreen


@dataclass(frozen=True)
class AutomationView:
    """How the console shows one kind of automation object, and an example to start from."""

    kind: AutomationKind
    label: str
    example: dict


AUTOMATION_VIEWS = {
    "schedules": AutomationView(
        SCHEDULES, "Schedules",
        {"name": "nightly-web01", "cron": "0 2 * * *",
         "job_definition": {"vm_identifier": "web01", "provider": "vsphere",
                            "export_method": "ova"}}),
    "backup_policies": AutomationView(
        BACKUP_POLICIES, "Backup policies",
        {"name": "weekly", "provider": "vsphere", "vm_filter": {"datacenter": "DC0"},
         "schedule": "0 3 * * 0", "retention": {"count": 4}}),
    "webhooks": AutomationView(
        WEBHOOKS, "Webhooks",
        {"url": "https://hooks.example.com/hypersdk", "events": ["job.completed",
                                                                 "job.failed"]}),
}
NAME_PROPERTIES = ("Name", "Url", "Id")
HIDDEN_PROPERTIES = NAME_PROPERTIES + ("Enabled", "Definition")


def _value(name: str, value) -> str:
    if name.endswith("Run") and isinstance(value, int):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value / 1e6)) if value else "—"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(value)
    return str(value)


def summary(props: dict) -> str:
    """The interesting properties in one line."""
    return "  ".join(f"{name}={_value(name, value)}" for name, value in sorted(props.items())
                     if name not in HIDDEN_PROPERTIES and value not in ("", "/"))


class CreateDialog(ModalScreen[str | None]):
    """A JSON editor for a new object's definition."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("ctrl+s", "create", "Create")]

    def __init__(self, view: AutomationView) -> None:
        super().__init__()
        self.automation_view = view

    def compose(self) -> ComposeResult:
        with Vertical(id="create-dialog"):
            yield Label(f"New {self.automation_view.label.lower()[:-1]}: the definition as JSON")
            yield TextArea(json.dumps(self.automation_view.example, indent=2), language=None, id="definition")
            yield Static(id="create-error")
            with Horizontal(classes="form-row"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#create")
    def action_create(self) -> None:
        text = self.query_one("#definition", TextArea).text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            self.query_one("#create-error", Static).update(Text(
                f"definition: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                style="red"))
            return
        if not isinstance(value, dict):
            self.query_one("#create-error", Static).update(
                Text("definition: must be a JSON object", style="red"))
            return
        self.dismiss(json.dumps(value))


class AutomationScreen(HyperScreen):
    BINDINGS = [
        Binding("n", "create", "New"),
        Binding("e", "toggle", "Enable/disable"),
        Binding("x", "run", "Run now / test"),
        Binding("d", "delete", "Delete"),
    ]

    def __init__(self, kind_name: str) -> None:
        super().__init__()
        self.automation_view = AUTOMATION_VIEWS[kind_name]
        self.kind = self.automation_view.kind
        self.heading = self.automation_view.label

    def compose_body(self) -> ComposeResult:
        yield Static(id="automation-note")
        yield DataTable(id="objects", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        table = self.query_one("#objects", DataTable)
        for column in ("Name", "Enabled", "Details"):
            table.add_column(column, key=column)
        self.rebuild()

    def objects(self) -> dict[str, dict]:
        found = self.hyper_app.client.mirror.objects_under(self.kind.path)
        return {path: ifaces.get(self.kind.interface, {}) for path, ifaces in found.items()}

    def rebuild(self) -> None:
        mirror = self.hyper_app.client.mirror
        note = self.query_one("#automation-note", Static)
        available = self.kind.name in mirror.capabilities.get("features", [])
        note.display = not available
        note.update(Text(f"{self.automation_view.label} are not available on this service.", style="dim"))
        table = self.query_one("#objects", DataTable)
        table.clear()
        for path, props in self.objects().items():
            name = next((str(props[n]) for n in NAME_PROPERTIES if props.get(n)),
                        path.rsplit("/", 1)[-1])
            enabled = props.get("Enabled")
            table.add_row(name, "—" if enabled is None else ("yes" if enabled else "no"),
                          summary(props), key=path)

    def client_event(self, event: ClientEvent) -> None:
        if event.type in ("objects", "service", "manager"):
            self.rebuild()

    def selected(self) -> str | None:
        table = self.query_one("#objects", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_create(self) -> None:
        def created(definition: str | None) -> None:
            if definition:
                self.create(definition)
        self.app.push_screen(CreateDialog(self.automation_view), created)

    @work(group="automation")
    async def create(self, definition: str) -> None:
        try:
            path = await self.hyper_app.client.call_manager(self.kind.create_method, "s",
                                                            definition)
        except ClientError as exc:
            self.report(exc)
            return
        self.notify(f"created {path.rsplit('/', 1)[-1]}")

    @work(group="automation")
    async def call(self, path: str, member: str, signature: str = "", *args) -> None:
        try:
            await self.hyper_app.client.call_object(path, self.kind.interface, member,
                                                    signature, *args)
        except ClientError as exc:
            self.report(exc)
            return
        self.notify(f"{member}: done for {path.rsplit('/', 1)[-1]}")

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Offer only what this kind of object supports."""
        if action == "run":
            return bool(self.kind.run_method)
        return True

    def action_run(self) -> None:
        path = self.selected()
        if path:
            self.call(path, self.kind.run_method)

    def action_toggle(self) -> None:
        path = self.selected()
        if path:
            enabled = bool(self.objects()[path].get("Enabled"))
            self.call(path, "SetEnabled", "b", not enabled)

    def action_delete(self) -> None:
        path = self.selected()
        if path:
            self.call(path, "Delete")
