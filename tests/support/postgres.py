"""A real PostgreSQL server from Debian's packages, on a private unix socket only.

initdb and the server run as the `postgres` user (the package makes it) in a directory of
their own; the server listens on no TCP port, only on a socket in that directory, with
trust authentication (nobody but root and postgres can enter the directory). fsync is off:
a test database need not survive a power cut. Each test gets a database of its own.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from .system import stop_process
from .wait import wait_until

USER = "postgres"
_numbers = itertools.count(1)


def _binaries() -> Path:
    """The bin directory of the newest PostgreSQL Debian installed."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda path: int(path.parent.parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (scripts/install-system-deps.sh)")
    return versions[-1].parent


def _as_postgres(command: list[str], directory: Path) -> subprocess.Popen:
    """`command` run as the postgres user, its output appended to server.log."""
    with (directory / "server.log").open("a") as log:
        return subprocess.Popen(command, user=USER, group=USER, extra_groups=[], cwd=directory,
                                stdout=log, stderr=subprocess.STDOUT)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, parents first (from /proc)."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return [found for child in children for found in (child, *_descendants(child))]


@dataclass
class PostgresServer:
    directory: Path  # data/, the socket and server.log
    process: subprocess.Popen

    @classmethod
    def start(cls, directory: Path) -> "PostgresServer":
        shutil.chown(directory, USER, USER)
        directory.chmod(0o700)
        bin_dir = _binaries()
        initdb = _as_postgres([str(bin_dir / "initdb"), "--auth=trust", "--username", USER,
                               "--encoding=UTF8", "--no-sync", "-D", str(directory / "data")],
                              directory)
        if initdb.wait() != 0:
            raise RuntimeError(f"initdb failed: {(directory / 'server.log').read_text()}")
        process = _as_postgres([str(bin_dir / "postgres"), "-D", str(directory / "data"),
                                "-k", str(directory), "-c", "listen_addresses=",
                                "-c", "fsync=off", "-c", "full_page_writes=off"], directory)
        server = cls(directory, process)
        wait_until(server.ready, what=f"PostgreSQL on {directory} (see server.log)")
        return server

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {(self.directory / 'server.log').read_text()}")
        return subprocess.run([str(_binaries() / "pg_isready"), "-q", "-h", str(self.directory)],
                              check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        """A postgresql:// URL of the unix-socket form, as users write in database.url."""
        return f"postgresql://{USER}@/{database}?host={self.directory}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = f"test_{next(_numbers)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    @contextmanager
    def hung(self) -> Iterator[None]:
        """The server and every backend stopped (SIGSTOP) while inside: connections stay
        open and nothing answers, as a hung or cut-off server; SIGCONT at the end."""
        stopped = [self.process.pid, *_descendants(self.process.pid)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in reversed(stopped):
                os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(self.directory, ignore_errors=True)
