"""Run a real hypervisord process on the private bus, as systemd would (NOTIFY_SOCKET)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .system import REPO, stop_process


def write_config(directory: Path, **overrides) -> Path:
    """A config file under `directory`; `overrides` are merged per top-level section."""
    config = {
        "daemon": {"workers": 2, "log_level": "debug"},
        "database": {"path": str(directory / "state" / "hypersdk.db")},
        "export": {"base_path": str(directory / "exports"), "max_retries": 2},
        "hyper2kvm": {"watch_dir": str(directory / "watch"),
                      "output_dir": str(directory / "kvm")},
        "api": {"audit_log": str(directory / "audit.log")},
        # callers may name files under the test's directory and libvirt's image pool
        "paths": {"sources": [str(directory), "/var/lib/libvirt/images"],
                  "outputs": [str(directory), "/var/lib/libvirt/images"]},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Hypervisord:
    config_path: Path
    bus_address: str
    process: subprocess.Popen | None = None
    notifications: list[str] = field(default_factory=list)
    log_path: Path | None = None
    module: str = "tests.support.run_daemon"  # the product's is hypersdk.service.daemon

    def start(self, timeout: float = 30) -> None:
        notify_path = self.config_path.parent / f"notify-{time.monotonic_ns()}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
               "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(REPO)}
        self.log_path = self.config_path.parent / "hypervisord.log"
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--config", str(self.config_path)],
            env=env, stdout=log_file, stderr=log_file, cwd=REPO)
        log_file.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"hypervisord exited with {self.process.returncode}:\n"
                                       + self.log())
                try:
                    message = notify.recv(4096).decode()
                except socket.timeout:
                    continue
                self.notifications.append(message)
                if "READY=1" in message.split("\n"):
                    return
            raise RuntimeError("hypervisord did not report READY=1:\n" + self.log())
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = 15) -> int:
        return stop_process(self.process, sig) if self.process else 0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
