"""The key bindings, one screen."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]hyperctl[/b] — the hypersdk migration console

[b]Screens[/b]
  v VMs   j jobs   s schedules   b backup policies   w webhooks
  ? help   ctrl+p command palette   q quit

[b]VMs[/b]
  type in the filter box (/) to narrow the list; the provider,
  datacenter and power selectors filter too
  o or a click on a column header: sort     r reload
  space mark/unmark a VM     m migrate the marked (or highlighted) VMs

[b]Jobs[/b]
  enter open the job (live log)   c cancel   r retry   / filter

[b]Schedules, backup policies, webhooks[/b]
  n create   e enable/disable   x run now / test   d delete

Press escape to close."""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Close"),
                Binding("question_mark", "app.pop_screen", "Close", show=False)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(HELP)
