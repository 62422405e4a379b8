"""A real hypersdk-bridge process next to a real hypervisord, and curl to talk to it.

The bridges run with token auth, the default. curl finds the admin token where a user
would put it, in curl's own config file (`$CURL_HOME/.curlrc`: `header = "Authorization:
Bearer ..."`), so the spec's curls run as written; a test passing `token=` turns that
file off (`curl -q`) and sends its own.
"""
from __future__ import annotations

import grp
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from hypersdk.http_bridge.auth import token_digest

from ..support.system import REPO, stop_process
from ..support.wait import wait_for_value, wait_until

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
CURL_HOME = "curl-home"


def token_api(directory: Path) -> dict:
    """`api` settings for token auth with ADMIN_TOKEN, as an installed bridge has: the
    tokens file (digests only, 0640 root:hypersdk) and a .curlrc holding the token."""
    tokens = directory / "bridge-tokens.yaml"
    tokens.write_text(yaml.safe_dump({token_digest(ADMIN_TOKEN): {"name": "admin",
                                                                  "role": "admin"}}))
    os.chown(tokens, 0, grp.getgrnam("hypersdk").gr_gid)
    tokens.chmod(0o640)
    write_curlrc(directory)
    return {"auth": "token", "tokens_file": str(tokens)}


def write_curlrc(directory: Path) -> None:
    """curl's config file for the bridges under `directory`: it sends ADMIN_TOKEN."""
    home = directory / CURL_HOME
    home.mkdir(exist_ok=True)
    (home / ".curlrc").write_text(f'header = "Authorization: Bearer {ADMIN_TOKEN}"\n')


LISTENING_RE = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")
ANY_PORT = "127.0.0.1:0"  # daemon.address for a test bridge: the kernel picks the port


@dataclass
class CurlResult:
    status: int
    body: str

    def json(self):
        return json.loads(self.body)


@dataclass
class Bridge:
    """A bridge process; its config says `daemon.address: 127.0.0.1:0` and `start` reads
    the port it took from its "listening on" log line."""

    config_path: Path
    bus_address: str
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    tls: bool = False
    user: str | None = None  # run as this Unix user, as hypersdk-bridge.service does

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20, wait_healthy: bool = True) -> "Bridge":
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
               "PYTHONPATH": str(REPO)}
        self.log_path = self.config_path.parent / f"bridge-{secrets.token_hex(4)}.log"
        self.port = 0
        with open(self.log_path, "ab") as log_file:
            command = [sys.executable, "-m", "hypersdk.http_bridge.main", "--config",
                       str(self.config_path)]
            if self.user:
                command = ["runuser", "-u", self.user, "--", *command]
            self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=log_file,
                                            cwd=REPO)
        try:
            wait_until(lambda: self._answers(wait_healthy), timeout, "/health to answer")
        except AssertionError:
            self.stop()  # a bridge that never answered is not left running
            raise RuntimeError("bridge did not answer /health:\n" + self.log()) from None
        return self

    def _answers(self, wait_healthy: bool) -> bool:
        """One look at a starting bridge: has it said its port, and does /health answer
        (200, or 503 while hypervisord is away unless `wait_healthy`)?"""
        if self.process.poll() is not None:
            raise RuntimeError(f"bridge exited with {self.process.returncode}:\n{self.log()}")
        self.port = self.port or self._listening_port()
        if not self.port:
            return False
        try:
            status = curl(self, "/health").status
        except subprocess.SubprocessError:
            return False
        return status == 200 or (status == 503 and not wait_healthy)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def _listening_port(self) -> int:
        found = LISTENING_RE.search(self.log())
        return int(found.group(1)) if found else 0

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a non-curl client sends: the admin token (ignored with auth none)."""
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def stop(self) -> int:
        return stop_process(self.process) if self.process else 0

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def curl_env(bridge: Bridge) -> dict[str, str]:
    """The environment for curl run against `bridge`: its .curlrc, as a user has it."""
    return {**os.environ, "CURL_HOME": str(bridge.config_path.parent / CURL_HOME)}


def curl(bridge: Bridge, path: str, *args: str, token: str | None = None,
         authorization: str | None = None, timeout: float = 30) -> CurlResult:
    """Run real curl against the bridge; returns the status and the body. `token` or
    `authorization` (the whole header value) replaces the .curlrc's admin token."""
    command = ["curl", "-s", "-S", "-k", "-o", "-", "-w", "\n%{http_code}", *args]
    if token or authorization is not None:
        command = ["curl", "-q", *command[1:],
                   "-H", f"Authorization: {authorization or 'Bearer ' + token}"]
    command.append(bridge.url + path)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=curl_env(bridge))
    if done.returncode not in (0, 22):
        raise subprocess.SubprocessError(f"curl failed: {done.stderr}")
    body, _, status = done.stdout.rpartition("\n")
    return CurlResult(int(status), body)


def post_json(bridge: Bridge, path: str, body: object, token: str | None = None) -> CurlResult:
    return curl(bridge, path, "-X", "POST", "-H", "Content-Type: application/json",
                "-d", body if isinstance(body, str) else json.dumps(body), token=token)


def wait_status(bridge, job_id: str, wanted: set[str], timeout: float = 20) -> dict:
    """Wait until /jobs/query says the job has one of the `wanted` statuses."""
    return wait_for_value(lambda: curl(bridge, f"/jobs/query?job_id={job_id}").json(),
                          lambda job: job.get("status") in wanted, timeout,
                          f"{job_id} to be one of {sorted(wanted)}")
