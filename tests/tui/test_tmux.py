"""The console in tmux as a person uses it: keys in, screen text out, real service behind."""
from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest

from .conftest import HYPERCTL, submit_job, wait_status


class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "console", *keys)

    def type(self, text: str) -> None:
        """Type like a person: one key at a time."""
        for char in text:
            self.keys("-l", char)
            time.sleep(0.05)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "console")

    def wait_for(self, text: str, timeout: float = 20, gone: str = "") -> str:
        """Wait until `text` is on the screen (and `gone`, if given, is not)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen and not (gone and gone in screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared (or {gone!r} stayed); the screen:\n"
                             f"{screen}")


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
    time.sleep(0.3)
    tmux.type(victim)
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
    time.sleep(0.5)  # a lone Escape, not the start of alt+q
    tmux.keys("q")
    tmux.wait_for("hyperctl-exited-0")
