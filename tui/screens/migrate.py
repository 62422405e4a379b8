"""Migrate: a form for the selected VMs → checked → the plan shown → submitted."""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, RadioSet, Select, Static

from hypersdk.client.errors import ClientError

from ..plan import EXPORT_METHODS, MODES, OUTPUT_FORMATS, MigrationForm, build_definitions, \
    describe, validate
from .base import HyperScreen


class MigrateScreen(HyperScreen):
    heading = "Migrate"
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"),
                Binding("ctrl+r", "review", "Review plan")]

    def __init__(self, vms: list[dict]) -> None:
        super().__init__()
        self.vms = vms
        self.reviewed: list[dict] | None = None

    def compose_body(self) -> ComposeResult:
        defaults = MigrationForm()
        names = ", ".join(vm.get("name", vm["identifier"]) for vm in self.vms)
        with VerticalScroll(id="migrate-form"):
            yield Static(Text.assemble(("VMs: ", "bold"), names), id="migrate-vms")
            with Horizontal(classes="form-row"):
                yield Label("Export method")
                yield Select([(m.upper(), m) for m in EXPORT_METHODS],
                             value=defaults.export_method, allow_blank=False, id="export-method")
                yield Label("Export path")
                yield Input(placeholder="under export.base_path (blank: default)",
                            id="export-path")
            with Horizontal(classes="form-row"):
                yield Checkbox("Shut down VM", defaults.shutdown_vm, id="shutdown")
                yield Checkbox("Remove CD-ROM", defaults.remove_cdrom, id="remove-cdrom")
                yield Checkbox("Compress export", defaults.compress, id="compress")
            yield Label("Conversion", classes="section")
            with RadioSet(id="mode"):
                for key, label in MODES.items():
                    yield RadioButton(label, value=key == defaults.mode, name=key, id=f"mode-{key}")
            with Horizontal(classes="form-row"):
                yield Label("Format")
                yield Select([(f, f) for f in OUTPUT_FORMATS], value=defaults.output_format,
                             allow_blank=False, id="format")
                yield Checkbox("Compressed qcow2", defaults.compression, id="compression")
            with Horizontal(classes="form-row"):
                yield Label("hyper2kvm instance (daemon mode)")
                yield Input(defaults.instance, id="instance")
            yield Label("Import to KVM", classes="section")
            with Horizontal(classes="form-row"):
                yield Checkbox("Define libvirt domain", defaults.import_to_kvm, id="import")
                yield Label("Network")
                yield Input(defaults.network, id="network")
                yield Checkbox("Autostart", defaults.autostart, id="autostart")
            with Horizontal(classes="form-row"):
                yield Button("Review plan", id="review", variant="primary")
                yield Button("Submit", id="submit", variant="success", disabled=True)
                yield Button("Back", id="back")
            yield Static(id="plan")

    def form(self) -> MigrationForm:
        def checked(widget_id: str) -> bool:
            return self.query_one(f"#{widget_id}", Checkbox).value

        def text(widget_id: str) -> str:
            return self.query_one(f"#{widget_id}", Input).value

        pressed = self.query_one("#mode", RadioSet).pressed_button
        return MigrationForm(
            export_method=str(self.query_one("#export-method", Select).value),
            export_path=text("export-path"), shutdown_vm=checked("shutdown"),
            remove_cdrom=checked("remove-cdrom"), compress=checked("compress"),
            mode=pressed.name if pressed else "", output_format=str(self.query_one(
                "#format", Select).value), compression=checked("compression"),
            instance=text("instance"), import_to_kvm=checked("import"),
            network=text("network"), autostart=checked("autostart"))

    # -- review and submit -------------------------------------------------------------
    def on_input_changed(self) -> None:
        self._invalidate()

    def on_checkbox_changed(self) -> None:
        self._invalidate()

    def on_select_changed(self) -> None:
        self._invalidate()

    def on_radio_set_changed(self) -> None:
        self._invalidate()

    def _invalidate(self) -> None:
        """Any edit after a review needs a new review before submitting."""
        if self.reviewed is not None:
            self.reviewed = None
            self.query_one("#submit", Button).disabled = True
            self.query_one("#plan", Static).update(Text("the form changed: review again",
                                                        style="dim"))

    def action_review(self) -> None:
        form = self.form()
        plan = self.query_one("#plan", Static)
        errors = validate(form, self.vms)
        if errors:
            self.reviewed = None
            self.query_one("#submit", Button).disabled = True
            text = Text("Fix these first:", style="bold red")
            for error in errors:
                text.append(f"\n  • {error}", style="red")
            plan.update(text)
            return
        definitions = build_definitions(form, self.vms)
        text = Text(f"Plan: {len(definitions)} export job(s)", style="bold")
        for vm, definition in zip(self.vms, definitions):
            text.append(f"\n{vm.get('name', vm['identifier'])}", style="bold")
            for number, step in enumerate(describe(definition, vm.get("name", "")), 1):
                text.append(f"\n  {number}. {step}")
        plan.update(text)
        self.reviewed = definitions
        self.query_one("#submit", Button).disabled = False

    @on(Button.Pressed, "#review")
    def _review(self) -> None:
        self.action_review()

    @on(Button.Pressed, "#back")
    def _back(self) -> None:
        self.app.pop_screen()

    @on(Button.Pressed, "#submit")
    def _submit(self) -> None:
        if self.reviewed:
            self.submit(self.reviewed)

    @work(group="submit", exclusive=True)
    async def submit(self, definitions: list[dict]) -> None:
        self.query_one("#submit", Button).disabled = True
        submitted = []
        for definition in definitions:
            try:
                submitted.append(await self.hyper_app.client.submit(definition, "export"))
            except ClientError as exc:
                self.report(exc)
                self.query_one("#plan", Static).update(
                    Text(f"{definition['vm_identifier']}: {exc}", style="red"))
                break
        if submitted:
            self.notify("submitted " + ", ".join(submitted), title="Migration started")
        if len(submitted) == len(definitions):
            self.app.pop_screen()
            self.hyper_app.switch_mode("jobs")
