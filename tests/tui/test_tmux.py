"""The console in tmux as a person uses it: keys in, screen text out, real service behind."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from ..support.wait import wait_for_value
from ..support.cli import HYPERCTL
from .conftest import submit_job, wait_status

FILTER_PLACEHOLDER = "filter: id, VM, operation"


class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "console", *keys)

    def type_into(self, placeholder: str, text: str) -> None:
        """Type like a person into the input showing `placeholder`: one key at a time,
        each once the input shows the ones before it."""
        lines = self.wait_for(placeholder).splitlines()
        row = next(index for index, line in enumerate(lines) if placeholder in line)
        for typed in range(1, len(text) + 1):
            self.keys("-l", text[typed - 1])
            wait_for_value(lambda: self.screen().splitlines()[row],
                           lambda line: text[:typed] in line, what=f"{text[:typed]!r} typed")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "console")

    def wait_for(self, text: str, timeout: float = 20, gone: str = "") -> str:
        """Wait until `text` is on the screen (and `gone`, if given, is not)."""
        return wait_for_value(self.screen, lambda screen: text in screen and not (
            gone and gone in screen), timeout, f"{text!r} on the screen"
            + (f" without {gone!r}" if gone else ""))


@pytest.fixture
def tmux(tmp_path):
    session = Tmux(f"hyperctl-test-{os.getpid()}-{tmp_path.name}")
    yield session
    subprocess.run(["tmux", "-L", session.socket, "kill-server"], capture_output=True)


@pytest.mark.slow
def test_console_in_tmux_cancel_and_follow_a_job(system_bus, hypervisord, tmux):
    done = submit_job(system_bus.address, {"steps": 1, "interval": 0.01}, "sleep")
    wait_status(system_bus.address, done, {"completed"})
    victim = submit_job(system_bus.address, {"steps": 600, "interval": 0.1}, "sleep")
    command = (f"DBUS_SYSTEM_BUS_ADDRESS={shlex.quote(system_bus.address)} TERM=xterm-256color "
               f"{HYPERCTL}; echo hyperctl-exited-$?; sleep 30")
    tmux.run("new-session", "-d", "-s", "console", "-x", "120", "-y", "40", command)

    screen = tmux.wait_for("hypervisord up")
    screen = tmux.wait_for(victim)
    assert done in screen and "completed" in screen

    tmux.keys("/")
    tmux.wait_for("Filter", gone="Retry")  # the footer's keys are the focused filter's
    tmux.type_into(FILTER_PLACEHOLDER, victim)
    tmux.wait_for(victim, gone=done)  # the filter leaves only the victim
    tmux.keys("Tab")
    tmux.keys("Enter")
    screen = tmux.wait_for("step 3")  # the job view's log, following
    assert "Stage: sleeping" in screen
    tmux.keys("c")
    tmux.wait_for("cancelled")
    assert wait_status(system_bus.address, victim, {"cancelled"}) == "cancelled"

    tmux.keys("Escape")
    tmux.wait_for("Operation")  # back on the jobs table
    tmux.keys("?")
    tmux.wait_for("Press escape to close.")
    tmux.keys("Escape")
    # The terminal cannot tell a lone Escape from the start of alt+q until its escape
    # delay has passed: q goes once the Escape has had its effect, the help gone.
    tmux.wait_for("Operation", gone="Press escape to close.")
    tmux.keys("q")
    tmux.wait_for("hyperctl-exited-0")
