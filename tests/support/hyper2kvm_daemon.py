"""The real hyper2kvm 0.2.1 daemon, started with the command line of our shipped unit
(data/systemd/hyper2kvm@.service), from its own venv.

The venv (`/var/tmp/hypersdk-hyper2kvm-0.2.1`, or $HYPERSDK_HYPER2KVM_VENV) is made by
scripts/install-system-deps.sh, which `make venv` runs.

hyper2kvm's daemon runs its offline guest fix on every disk, through qemu-nbd and the
kernel's nbd driver. Where the kernel has no nbd (this CI machine, a Firecracker VM
booted with `nomodule`), that stage fails every conversion ("Failed to load NBD
module"). `fake_guest_fix=True` replaces that one stage (OfflineFSFix.run) with a
no-op, named as a fake in the daemon's log; the watcher, the workflow directories,
the markers, the per-manifest orchestrator and the conversion stay hyper2kvm's.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "data" / "systemd" / "hyper2kvm@.service"
VENV = Path(os.environ.get("HYPERSDK_HYPER2KVM_VENV", "/var/tmp/hypersdk-hyper2kvm-0.2.1"))
SHIPPED_BINARY = "/usr/local/bin/hyper2kvm"
READY_LINE = "Manifest workflow daemon ready"
FAKE_GUEST_FIX = """
import sys
from hyper2kvm.fixers.offline_fixer import OfflineFSFix

def fake_guest_fix(self):
    self.logger.info("FAKE guest fix (hypersdk test): no nbd in this kernel; disk left as is")

OfflineFSFix.run = fake_guest_fix
from hyper2kvm.__main__ import main
sys.argv[0] = "hyper2kvm"
main()
"""


def unit_command(environment: dict[str, str]) -> list[str]:
    """ExecStart of the shipped unit, its ${VARS} taken from `environment`, the binary
    from the test venv."""
    text = UNIT.read_text().replace("\\\n", " ")
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1)
    words = [re.sub(r"\$\{(\w+)\}", lambda m: environment[m.group(1)], word)
             for word in shlex.split(exec_start)]
    assert words[0] == SHIPPED_BINARY, words
    return [str(VENV / "bin" / "hyper2kvm"), *words[1:]]


class Hyper2kvmDaemon:
    """One running daemon; its output is kept in `lines`."""

    def __init__(self, watch_dir: Path, output_dir: Path, home: Path,
                 fake_guest_fix: bool) -> None:
        if not (VENV / "bin" / "hyper2kvm").exists():
            raise RuntimeError(f"{VENV}/bin/hyper2kvm is missing: run "
                               "scripts/install-system-deps.sh (make venv)")
        command = unit_command({"HYPER2KVM_WATCH_DIR": str(watch_dir),
                                "HYPER2KVM_OUTPUT_DIR": str(output_dir)})
        if fake_guest_fix:
            command = [str(VENV / "bin" / "python"), "-c", FAKE_GUEST_FIX, *command[1:]]
        self.command = command
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1"))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(60) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("hyper2kvm daemon did not start: " + self.text()[-3000:])

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if READY_LINE in line:
                self._ready.set()
        self._ready.set()  # it exited: the waiter looks at poll()

    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        """SIGKILL: 0.2.1 never exits on SIGTERM (its handler deadlocks:
        DaemonStatistics.save holds its lock while get_summary takes it again)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
