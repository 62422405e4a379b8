"""The console ends when its terminal goes away (an ssh drop, a killed tmux session).

A console started in a session of its own (`runuser -u USER --`, `sudo -u`) has no
controlling terminal, so nobody sends it SIGHUP when its pty is closed; its input
then reads end-of-file forever, at full speed. A thread blocked in poll() on the
terminal, asking for no event at all, sleeps until the kernel reports a hang-up
(POLLHUP is reported whether asked for or not) and then calls `on_hangup` once.
"""
from __future__ import annotations

import select
import threading
from collections.abc import Callable

GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def watch_hangup(fd: int, on_hangup: Callable[[], None]) -> threading.Thread:
    """Call `on_hangup` (from another thread) once `fd`'s terminal is gone."""
    def wait() -> None:
        poller = select.poll()
        poller.register(fd, 0)
        while not any(mask & GONE for _, mask in poller.poll()):
            pass
        on_hangup()

    thread = threading.Thread(target=wait, name="terminal-hangup", daemon=True)
    thread.start()
    return thread
