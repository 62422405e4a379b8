"""The frame every console screen shares: status line, service banner, body, footer."""
from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Static

from hypersdk.client.errors import ClientError

from ..client import ClientEvent
from ..widgets import ServiceBanner, StatusLine

if TYPE_CHECKING:
    from ..app import HyperctlApp


class HyperScreen(Screen):
    """A screen fed by the app's client; subclasses fill `compose_body` and `client_event`."""

    heading = ""

    @property
    def hyper_app(self) -> "HyperctlApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status-line")
        yield ServiceBanner(id="banner")
        if self.heading:
            yield Static(self.heading, classes="heading")
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.hyper_app.client_changed.subscribe(self, self.client_event)

    def client_event(self, event: ClientEvent) -> None:
        """Called for every change of the mirror; the default ignores them."""

    def report(self, error: ClientError) -> None:
        self.hyper_app.report_error(error)
