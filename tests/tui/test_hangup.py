"""A console whose terminal goes away (an ssh drop, a killed tmux session) exits at once.

Run as `runuser -u USER -- hyperctl` runs it: in a session of its own, so no SIGHUP
reaches it when the pty is closed. Before the fix it stayed, reading end-of-file
from the dead pty thousands of times a second at most of a core.
"""
from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time

from ..support.wait import wait_exit
from ..support.cli import HYPERCTL

EXIT_HANGUP = 129


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc/PID/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_until(master: int, text: bytes, timeout: float) -> bytes:
    """What the console wrote to its terminal, up to the first `text`."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never appeared; the console wrote:\n{seen[-2000:]!r}"
        if select.select([master], [], [], min(left, 0.2))[0]:
            seen += os.read(master, 65536)
    return seen


def test_console_exits_when_its_terminal_goes_away(system_bus, hypervisord):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color",
           "DBUS_SYSTEM_BUS_ADDRESS": system_bus.address}
    console = subprocess.Popen([str(HYPERCTL)], stdin=slave, stdout=slave, stderr=slave,
                               env=env, start_new_session=True)
    os.close(slave)
    try:
        read_until(master, b"hypervisord up", timeout=30)
        os.write(master, b"?")  # a key's answer on the screen: the start-up has settled
        read_until(master, b"Press escape to close.", timeout=30)
        before = cpu_seconds(console.pid)
        closed = time.monotonic()
        os.close(master)  # what sshd or tmux does when the connection or session goes
        ended = wait_exit(console.pid, timeout=5)
        took = time.monotonic() - closed
        if ended is None:
            spent = cpu_seconds(console.pid) - before
            raise AssertionError(f"the console still runs {took:.1f} s after its terminal "
                                 f"went away, having used {spent:.2f} s of CPU meanwhile")
    finally:
        if console.poll() is None:  # reaped by wait_exit, or still to be killed
            console.kill()
            console.wait()
    code, cpu = ended
    spent = cpu - before
    print(f"exited {code} {took:.2f} s after the hang-up, using {spent:.2f} s of CPU meanwhile")
    assert code == EXIT_HANGUP
    assert spent < 0.5  # not spinning on the dead terminal meanwhile
