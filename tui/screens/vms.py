"""VMs: a provider's VMs with type-to-filter, sort, datacenter/power filters and details."""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select, Static

from hypersdk.client.errors import ClientError

from .. import format as fmt
from ..client import ClientEvent
from .base import HyperScreen
from .migrate import MigrateScreen

POWER_STATES = ("poweredOn", "poweredOff", "suspended")
POWER_STYLES = {"poweredOn": "green", "poweredOff": "dim", "suspended": "yellow"}
# column label -> (VM field used to sort, cell renderer)
COLUMNS = {
    "✓": (None, None),
    "Name": ("name", lambda vm: vm.get("name", "")),
    "Power": ("power_state", lambda vm: Text(vm.get("power_state", ""),
                                            style=POWER_STYLES.get(vm.get("power_state"), ""))),
    "CPUs": ("cpus", lambda vm: str(vm.get("cpus", ""))),
    "Memory": ("memory_mb", lambda vm: fmt.memory_mb(vm.get("memory_mb"))),
    "Disk": ("disk_bytes", lambda vm: fmt.size(vm.get("disk_bytes"))),
    "Guest OS": ("guest_os", lambda vm: vm.get("guest_os", "")),
    "Datacenter": ("datacenter", lambda vm: vm.get("datacenter", "")),
}
SORTABLE = [label for label, (field, _) in COLUMNS.items() if field]


def sort_key(value) -> tuple:
    """Numbers by value, everything else by lower-cased text; numbers first."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value or "").lower())


def vm_details(vm: dict) -> Text:
    """The details pane: identity, firmware, disks and NICs."""
    text = Text(vm.get("name", ""), style="bold")
    for label, value in (("id", vm.get("identifier")), ("path", vm.get("path")),
                         ("guest", vm.get("guest_os")),
                         ("firmware", vm.get("firmware", "") + (" + secure boot"
                                                                if vm.get("secure_boot") else "")),
                         ("cpus", vm.get("cpus")), ("memory", fmt.memory_mb(vm.get("memory_mb")))):
        text.append(f"\n{label:>8}: ", style="dim")
        text.append(str(value or "—"))
    text.append("\n\nDisks", style="bold")
    for disk in vm.get("disks", []) or []:
        text.append(f"\n  {disk.get('label') or disk.get('key')}: "
                    f"{fmt.size(disk.get('capacity_bytes'))} {disk.get('controller', '')}")
        if disk.get("location"):
            text.append(f"\n    {disk['location']}", style="dim")
    if not vm.get("disks"):
        text.append("\n  none")
    text.append("\n\nNICs", style="bold")
    for nic in vm.get("nics", []) or []:
        text.append(f"\n  {nic.get('mac') or '—'} → {nic.get('network') or '—'} "
                    f"{nic.get('adapter', '')}")
    if not vm.get("nics"):
        text.append("\n  none")
    return text


class VMsScreen(HyperScreen):
    heading = "VMs"
    BINDINGS = [
        Binding("space", "mark", "Mark"),
        Binding("m", "migrate", "Migrate"),
        Binding("o", "cycle_sort", "Sort"),
        Binding("r", "reload", "Reload"),
        Binding("slash", "focus_filter", "Filter", key_display="/"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.vms: list[dict] = []
        self.provider_names: list[str] = []
        self.marked: set[str] = set()
        self.sort_label = "Name"
        self.sort_reverse = False

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="filters"):
            yield Select([], prompt="Provider", id="provider", allow_blank=True)
            yield Input(placeholder="type to filter…", id="vm-filter")
            yield Select([], prompt="All datacenters", id="datacenter")
            yield Select([(s, s) for s in POWER_STATES], prompt="Any power state", id="power")
        with Horizontal(id="vms-body"):
            yield DataTable(id="vms", cursor_type="row", zebra_stripes=True)
            yield Static(id="vm-details")

    def on_mount(self) -> None:
        super().on_mount()
        table = self.query_one("#vms", DataTable)
        for label in COLUMNS:
            table.add_column(label, key=label)
        self.refresh_providers()
        table.focus()

    # -- data --------------------------------------------------------------------------
    def refresh_providers(self) -> None:
        select = self.query_one("#provider", Select)
        names = [p["name"] for p in self.hyper_app.client.mirror.providers()
                 if p.get("configured", True)]
        if names == self.provider_names:
            return  # JobCounts changes also arrive as manager events
        self.provider_names = names
        current = select.value
        select.set_options([(name, name) for name in names])
        if current in names:
            select.value = current
        elif names:
            select.value = names[0]

    @on(Select.Changed, "#provider")
    def _provider_changed(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        provider = self.query_one("#provider", Select).value
        if provider is not Select.NULL:
            self.load(str(provider))

    @work(group="vms", exclusive=True)
    async def load(self, provider: str) -> None:
        details = self.query_one("#vm-details", Static)
        details.update(Text(f"loading the VMs of {provider}…", style="dim"))
        try:
            self.vms = await self.hyper_app.client.list_vms(provider)
        except ClientError as exc:
            self.vms = []
            details.update(Text(str(exc), style="red"))
            self.report(exc)
        self.marked &= {vm["identifier"] for vm in self.vms}
        datacenters = sorted({vm.get("datacenter", "") for vm in self.vms} - {""})
        self.query_one("#datacenter", Select).set_options([(d, d) for d in datacenters])
        self.rebuild()

    def client_event(self, event: ClientEvent) -> None:
        if event.type in ("service", "manager"):
            self.refresh_providers()

    # -- table -------------------------------------------------------------------------
    def visible(self) -> list[dict]:
        needle = self.query_one("#vm-filter", Input).value.strip().lower()
        datacenter = self.query_one("#datacenter", Select).value
        power = self.query_one("#power", Select).value
        rows = [vm for vm in self.vms
                if needle in " ".join(str(vm.get(k, "")) for k in
                                      ("name", "guest_os", "path", "identifier")).lower()
                and (datacenter is Select.NULL or vm.get("datacenter") == datacenter)
                and (power is Select.NULL or vm.get("power_state") == power)]
        field = COLUMNS[self.sort_label][0]
        return sorted(rows, key=lambda vm: sort_key(vm.get(field)), reverse=self.sort_reverse)

    def rebuild(self) -> None:
        table = self.query_one("#vms", DataTable)
        table.clear()
        for vm in self.visible():
            mark = "✓" if vm["identifier"] in self.marked else ""
            table.add_row(mark, *[render(vm) for _, render in list(COLUMNS.values())[1:]],
                          key=vm["identifier"])
        arrow = "▼" if self.sort_reverse else "▲"
        for label, column in table.columns.items():
            column.label = Text(f"{label.value} {arrow}" if label.value == self.sort_label
                                else label.value)
        self.show_details()

    def highlighted(self) -> dict | None:
        table = self.query_one("#vms", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((vm for vm in self.vms if vm["identifier"] == key), None)

    def show_details(self) -> None:
        vm = self.highlighted()
        details = self.query_one("#vm-details", Static)
        details.update(vm_details(vm) if vm else Text("no VM matches", style="dim"))

    @on(DataTable.RowHighlighted, "#vms")
    def _highlighted(self) -> None:
        self.show_details()

    @on(Input.Changed, "#vm-filter")
    @on(Select.Changed, "#datacenter")
    @on(Select.Changed, "#power")
    def _filter_changed(self) -> None:
        self.rebuild()

    @on(DataTable.HeaderSelected, "#vms")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        label = event.column_key.value
        if label in SORTABLE:
            self.sort_reverse = not self.sort_reverse if label == self.sort_label else False
            self.sort_label = label
            self.rebuild()

    # -- actions -----------------------------------------------------------------------
    def action_focus_filter(self) -> None:
        self.set_focus(self.query_one("#vm-filter", Input))

    def action_cycle_sort(self) -> None:
        self.sort_label = SORTABLE[(SORTABLE.index(self.sort_label) + 1) % len(SORTABLE)]
        self.sort_reverse = False
        self.rebuild()

    def action_mark(self) -> None:
        vm = self.highlighted()
        if vm is None:
            return
        self.marked ^= {vm["identifier"]}
        table = self.query_one("#vms", DataTable)
        table.update_cell(vm["identifier"], "✓", "✓" if vm["identifier"] in self.marked else "")
        table.action_cursor_down()

    def selection(self) -> list[dict]:
        chosen = [vm for vm in self.vms if vm["identifier"] in self.marked]
        if chosen:
            return chosen
        vm = self.highlighted()
        return [vm] if vm else []

    def action_migrate(self) -> None:
        vms = self.selection()
        if not vms:
            self.notify("no VM to migrate: mark VMs with space", severity="warning")
            return
        self.app.push_screen(MigrateScreen(vms))
