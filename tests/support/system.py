"""Real system peers for tests: a private system bus, polkitd on it, real Unix users.

Everything runs as root in CI. The bus is a dbus-daemon with a copy of Debian's
system.conf that listens on its own socket and also reads the project's policy file;
polkitd reads the project's action and rules files, installed where it looks for them.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
POLKIT_NAME = "org.freedesktop.PolicyKit1"
MEMBER, OUTSIDER, ADMIN = "hsdk-member", "hsdk-outsider", "hsdk-admin"


PERMISSIVE_POLICY = """  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>"""


def _bus_config(socket_path: Path, permissive: bool) -> str:
    config = Path("/usr/share/dbus-1/system.conf").read_text()
    config = re.sub(r"<listen>.*?</listen>", f"<listen>unix:path={socket_path}</listen>", config)
    config = re.sub(r"<pidfile>.*?</pidfile>", "", config)
    config = config.replace("<fork/>", "")
    config = config.replace("<standard_system_servicedirs/>", "")
    config = config.replace("<includedir>system.d</includedir>",
                            "<includedir>/usr/share/dbus-1/system.d</includedir>\n"
                            f"  <includedir>{REPO}/data/dbus-1/system.d</includedir>")
    if permissive:  # for fakes of other services (dbusmock's systemd): any name, any call
        config = config.replace("</busconfig>", PERMISSIVE_POLICY)
    return config


@dataclass
class PrivateSystemBus:
    address: str
    process: subprocess.Popen

    @classmethod
    def start(cls, directory: Path, permissive: bool = False) -> "PrivateSystemBus":
        """A system bus with Debian's policy and ours; `permissive` lets anything own any
        name and call anything (for python-dbusmock's templates)."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        socket_path = directory / "system_bus_socket"
        config = directory / "system.conf"
        config.write_text(_bus_config(socket_path, permissive))
        process = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                                    "--print-address"], stdout=subprocess.PIPE, text=True)
        address = process.stdout.readline().strip()
        if not address:
            raise RuntimeError("dbus-daemon did not start")
        return cls(address, process)

    def env(self) -> dict:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _private_polkit_dirs(directory: Path) -> tuple[Path, Path]:
    """Copies of the machine's polkit actions plus the project's, and a rules directory
    holding only the project's rules, for a polkitd of this test session alone."""
    actions, rules = directory / "actions", directory / "rules.d"
    shutil.copytree(POLKIT_ACTIONS_DIR, actions, dirs_exist_ok=True)
    shutil.copy(REPO / "polkit/org.hypersdk.HyperSDK1.policy", actions)
    rules.mkdir(exist_ok=True)
    shutil.copy(REPO / "polkit/50-hypersdk.rules", rules)
    for path in (directory, actions, rules):
        path.chmod(0o755)
    return actions, rules


def start_polkitd(bus: PrivateSystemBus, directory: Path) -> subprocess.Popen:
    """The real polkitd on `bus`, reading the project's actions and rules from private
    copies under `directory`: it runs in a mount namespace of its own where they are
    bind-mounted over the system's directories, so nothing is installed on the machine
    and two checkouts' test runs never read each other's rules."""
    actions, rules = _private_polkit_dirs(directory)
    script = ('mount --bind "$1" "$3" && mount --bind "$2" "$4" && '
              'exec /usr/lib/polkit-1/polkitd --no-debug')
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         str(actions), str(rules), str(POLKIT_ACTIONS_DIR), str(POLKIT_RULES_DIR)],
        env=bus.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_name(bus.address, POLKIT_NAME, process, "polkitd")
    return process


def wait_for_name(address: str, name: str, process: subprocess.Popen, what: str,
                  timeout: int = 20) -> None:
    """Until `name` is owned on the bus at `address` (`gdbus wait` hears the bus's
    NameOwnerChanged). If it never is, `process`, which should own it, is killed and
    the error says how it ended and what it wrote to a piped stderr."""
    waited = subprocess.run(["gdbus", "wait", "--address", address, "--timeout", str(timeout),
                             name], capture_output=True, text=True)
    if waited.returncode == 0:
        return
    exited = process.poll()
    process.kill()
    process.wait()
    said = process.stderr.read()[-2000:] if process.stderr else b""
    said = said.decode(errors="replace") if isinstance(said, bytes) else said
    raise RuntimeError(f"{what} never owned {name} (exit status: {exited}): "
                       f"{waited.stderr}{said}")


def existing_user(name: str, groups: list[str]) -> int:
    """The uid of a test user, who must be in exactly `groups` (besides their primary
    group). The users are made by scripts/install-system-deps.sh, never by a test run."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"user {name} is missing: run scripts/install-system-deps.sh "
                           "(make venv does) to make the tests' users") from None
    primary = grp.getgrgid(user.pw_gid).gr_name
    member_of = {group.gr_name for group in grp.getgrall() if name in group.gr_mem}
    if member_of - {primary} != set(groups) - {primary}:
        raise RuntimeError(f"user {name} is in groups {sorted(member_of)}, the tests expect "
                           f"{sorted(groups)}: run scripts/install-system-deps.sh")
    return user.pw_uid


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def open_to_test_users(directory: Path) -> None:
    """Let the test users traverse `directory` and pytest's base directories above it
    (pytest-of-<user> and pytest-<n>, made 0700 wherever $TMPDIR puts them)."""
    directory.chmod(0o755)
    for parent in directory.parents:
        if parent.name.startswith("pytest-"):
            os.chmod(parent, 0o755)
