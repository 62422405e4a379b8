"""Shared fixtures: a private system bus with real polkitd, real users, a real hypervisord."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hypersdk.client.bus import connect

from .support.filesystems import mounted_tmpfs
from .support.hypervisord import Hypervisord, write_config
from .support.postgres import PostgresServer
from .support.simulator import module_sim, si, sim, vcsim_binary  # noqa: F401 - fixtures
from .support.gluster import gluster_volume  # noqa: F401 - fixture
from .support.targets import local_libvirt, loopback_sshd, tls_libvirt  # noqa: F401
from .support.system import (ADMIN, MEMBER, OUTSIDER, PrivateSystemBus, existing_user,
                             start_polkitd, stop_process)


@pytest.fixture(scope="session")
def system_bus() -> PrivateSystemBus:
    """A private dbus-daemon using Debian's system.conf plus the project's policy.

    Its socket lives outside pytest's root-only tmp tree: polkitd drops to its own
    user and the test users must reach the socket too.
    """
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-bus-"))
    bus = PrivateSystemBus.start(directory)
    yield bus
    bus.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A real PostgreSQL server on a private unix socket (tests/support/postgres.py)."""
    server = PostgresServer.start(Path(tempfile.mkdtemp(prefix="hypersdk-pg-")))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The database.url of a fresh empty store, once for each engine."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/jobs.db"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def polkitd(system_bus):
    """The real polkitd on the private bus, with the project's actions and rules."""
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-polkit-"))
    process = start_polkitd(system_bus, directory)
    yield process
    stop_process(process)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def users() -> dict[str, int]:
    """Real users: one in group hypersdk, one outside it, one in hypersdk-admin."""
    return {
        MEMBER: existing_user(MEMBER, ["hypersdk"]),
        OUTSIDER: existing_user(OUTSIDER, []),
        ADMIN: existing_user(ADMIN, ["hypersdk", "hypersdk-admin"]),
    }


@pytest.fixture
def service_dir(tmp_path) -> Path:
    """A directory the test users can traverse (tmp_path's parents are root-only)."""
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's base under $TMPDIR, made 0700
        if parent.name.startswith("pytest-of-"):
            os.chmod(parent, 0o755)
    return tmp_path


@pytest.fixture
def start_hypervisord(system_bus, polkitd, users, service_dir):
    """Start hypervisord(s) with a config under the test's directory; stopped at the end."""
    started: list[Hypervisord] = []

    def start(**overrides) -> Hypervisord:
        config = write_config(service_dir, **overrides)
        daemon = Hypervisord(config, system_bus.address)
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def hypervisord(start_hypervisord) -> Hypervisord:
    return start_hypervisord()


@pytest.fixture
async def client_bus(system_bus):
    """A root dbus-fast connection to the private bus, as a client."""
    bus = await connect(system_bus.address)
    yield bus
    bus.disconnect()


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "small", "4m") as directory:
        yield directory
