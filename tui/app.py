"""hyperctl's full-screen console: a Textual app over the D-Bus client.

Screens are Textual modes (VMs, Jobs, Schedules, Backup policies, Webhooks) with
one shared client. The client's listener posts `ClientUpdate` messages to the app;
the app republishes them on `client_changed`, to which widgets and screens
subscribe. Nothing polls: every change on screen comes from a D-Bus signal.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal

from hypersdk.client.errors import ClientError

from .client import ClientEvent, HyperClient, LogLine, Mirror
from .hangup import watch_hangup
from .messages import ClientUpdate
from .screens.automation import AUTOMATION_VIEWS, AutomationScreen
from .screens.help import HelpScreen
from .screens.job import JobScreen
from .screens.jobs import JobsScreen
from .screens.plans import PlansScreen
from .screens.vms import VMsScreen


class ConsoleClient(Protocol):
    """What the console needs from a client (HyperClient, or a fixed one in tests)."""

    bus_spec: str
    mirror: Mirror

    @property
    def connected(self) -> bool: ...
    def subscribe(self, listener: Callable[[ClientEvent], None]) -> Callable[[], None]: ...
    async def run(self) -> None: ...
    def close(self) -> None: ...
    async def list_vms(self, provider: str, vm_filter: dict | None = None) -> list[dict]: ...
    async def submit(self, definition: dict, kind: str = "export") -> str: ...
    async def cancel(self, job_id: str) -> None: ...
    async def retry(self, job_id: str) -> str: ...
    def follow_log(self, job_id: str, follow: bool = True) -> AsyncIterator[LogLine]: ...
    async def call_manager(self, member: str, signature: str, *args: Any) -> Any: ...
    async def call_object(self, path: str, interface: str, member: str, signature: str = "",
                          *args: Any) -> Any: ...


# What a shell reports for a process ended by SIGHUP: the console's terminal went away.
EXIT_HANGUP = 129

SCREENS_BY_KEY = {"v": ("vms", "VMs"), "j": ("jobs", "Jobs"), "s": ("schedules", "Schedules"),
                  "b": ("backup_policies", "Backup policies"), "w": ("webhooks", "Webhooks")}


class HyperctlApp(App):
    CSS_PATH = "hyperctl.tcss"
    TITLE = "hyperctl"
    MODES = {
        "vms": VMsScreen,
        "jobs": JobsScreen,
        "plans": PlansScreen,  # from the command palette ("Show Plans")
        **{kind: (lambda kind=kind: AutomationScreen(kind)) for kind in AUTOMATION_VIEWS},
    }
    BINDINGS = [
        *[Binding(key, f"show('{mode}')", label) for key, (mode, label) in SCREENS_BY_KEY.items()],
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, client: ConsoleClient, *, start_mode: str = "jobs",
                 clock: Callable[[], float] = time.time, terminal: int | None = None) -> None:
        """`terminal`: the file descriptor of the console's terminal, watched for a hang-up."""
        super().__init__()
        self.client = client
        self.terminal = terminal
        self.clock = clock
        self.start_mode = start_mode
        self.client_changed: Signal[ClientEvent] = Signal(self, "client_changed")

    def on_mount(self) -> None:
        self.client.subscribe(lambda event: self.post_message(ClientUpdate(event)))
        self.keep_connected()
        self.switch_mode(self.start_mode)
        if self.terminal is not None:
            loop = asyncio.get_running_loop()
            watch_hangup(self.terminal, lambda: loop.call_soon_threadsafe(self.hang_up))

    def hang_up(self) -> None:
        """The terminal is gone: nobody can see or type into the console any more."""
        self.exit(return_code=EXIT_HANGUP)

    @work(group="client", exclusive=True)
    async def keep_connected(self) -> None:
        await self.client.run()

    def on_client_update(self, message: ClientUpdate) -> None:
        self.client_changed.publish(message.event)
        if message.event.type == "service" and not self.client.mirror.service_up:
            self.notify("hypervisord is not reachable; reconnecting…", severity="warning")

    def on_unmount(self) -> None:
        self.client.close()

    # -- navigation --------------------------------------------------------------------
    def action_show(self, mode: str) -> None:
        self.switch_mode(mode)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def open_job(self, job_id: str) -> None:
        self.push_screen(JobScreen(job_id))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for key, (mode, label) in SCREENS_BY_KEY.items():
            yield SystemCommand(f"Show {label}", f"Switch to the {label} screen ({key})",
                                lambda mode=mode: self.switch_mode(mode))
        yield SystemCommand("Migrate VMs", "Open the VMs screen to pick VMs to migrate (m)",
                            lambda: self.switch_mode("vms"))
        yield SystemCommand("Show Plans", "Migration plans and their VMs: preflight, start, "
                            "cancel", lambda: self.switch_mode("plans"))
        yield SystemCommand("Help", "Key bindings (?)", self.action_help)

    # -- actions on jobs ---------------------------------------------------------------
    def report_error(self, error: ClientError) -> None:
        """A refused or failed request, told to the person in words."""
        if error.access_denied:
            self.notify(error.message, title="Not authorized", severity="error", timeout=10)
        else:
            self.notify(error.message, title=error.name, severity="error", timeout=8)

    @work(group="actions")
    async def cancel_job(self, job_id: str) -> None:
        try:
            await self.client.cancel(job_id)
        except ClientError as exc:
            self.report_error(exc)
            return
        self.notify(f"cancel requested for {job_id}")

    @work(group="actions")
    async def retry_job(self, job_id: str) -> None:
        try:
            new_id = await self.client.retry(job_id)
        except ClientError as exc:
            self.report_error(exc)
            return
        self.notify(f"{job_id} retried as {new_id}")
        if isinstance(self.screen, JobScreen):
            self.switch_screen(JobScreen(new_id))


def run_console(bus: str = "system") -> int:
    app = HyperctlApp(HyperClient(bus), terminal=sys.__stdin__.fileno())
    app.run()
    return app.return_code or 0
