"""Widgets shared by the console's screens: the status line and the service banner."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import Static

from hypersdk.client.names import JOB_STATUSES

from .client import ClientEvent

if TYPE_CHECKING:
    from .app import HyperctlApp

STATUS_STYLES = {"pending": "yellow", "running": "bold cyan", "completed": "green",
                 "failed": "bold red", "cancelled": "magenta"}


def styled_status(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


class ClientAware(Static):
    """A Static that re-renders from the app's client mirror whenever it changes."""

    @property
    def hyper_app(self) -> "HyperctlApp":
        return self.app  # type: ignore[return-value]

    def on_mount(self) -> None:
        self.hyper_app.client_changed.subscribe(self, self._on_client_event)
        self.update(self.render_state())

    def _on_client_event(self, event: ClientEvent) -> None:
        if event.type in ("service", "manager", "objects"):
            self.update(self.render_state())

    def render_state(self) -> Text:
        raise NotImplementedError


class StatusLine(ClientAware):
    """hyperctl · service health · version · job counts."""

    def render_state(self) -> Text:
        client = self.hyper_app.client
        mirror = client.mirror
        text = Text(" hyperctl ", style="bold reverse")
        if mirror.service_up:
            text.append("  ● hypervisord up", style="green")
            text.append(f" {mirror.version}" if mirror.version else "")
        else:
            text.append("  ● hypervisord down", style="bold red")
        if client.bus_spec != "system":
            text.append(f"  bus: {client.bus_spec.split(',guid=')[0]}", style="dim")
        counts = mirror.job_counts
        if counts:
            text.append("   jobs:")
            for status in JOB_STATUSES:
                if counts.get(status):
                    text.append(f" {counts[status]} {status}", style=STATUS_STYLES[status])
        return text


class ServiceBanner(ClientAware):
    """Shown only while hypervisord cannot be reached."""

    def render_state(self) -> Text:
        client = self.hyper_app.client
        self.display = not client.mirror.service_up
        if not client.connected:
            return Text(f"Cannot reach the {client.bus_spec} bus — reconnecting…")
        return Text("hypervisord is not running — waiting for it to come back…")
