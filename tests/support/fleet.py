"""Real hypervisords sharing one PostgreSQL database, each on a private system bus of its
own, as conversion hosts would (service/fleet.py). Callers are root: polkit is not asked."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hypersdk.service.store import JobRecord, Store, open_store

from .cli import BUS_NAME, MANAGER, MANAGER_IFACE, busctl, busctl_json, submit
from .hypervisord import Hypervisord, write_config
from .system import PrivateSystemBus

T = TypeVar("T")
LEASE = "5s"  # a killed instance's jobs are recovered soon; a loaded 2-core host still renews it
POLL = "200ms"


@dataclass
class Instance:
    name: str
    bus: PrivateSystemBus
    daemon: Hypervisord

    @property
    def address(self) -> str:
        return self.bus.address

    def submit(self, kind: str, definition: dict) -> str:
        """The id of the job submitted through this instance's bus."""
        reply = submit(self.address, definition, kind=kind).stdout.split()[1].strip('"')
        return "job-" + reply.rsplit("/job_", 1)[1]

    def get_job(self, job_id: str) -> dict:
        """Manager.GetJob through this instance's bus: {property: value}."""
        reply = busctl_json(self.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetJob",
                            "sa{sv}", job_id, "0")
        return {name: value["data"] for name, value in reply["data"][0].items()}

    def list_jobs(self) -> list[str]:
        """Manager.ListJobs through this instance's bus: the job objects on it."""
        reply = busctl_json(self.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ListJobs",
                            "a{sv}", "0")
        return reply["data"][0]

    def cancel(self, job_id: str) -> None:
        busctl(self.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "CancelJob", "sa{sv}",
               job_id, "0")

    def restart(self) -> None:
        self.daemon = Hypervisord(self.daemon.config_path, self.address)
        self.daemon.start()


@dataclass
class Fleet:
    """Instances named by their daemon.instance, sharing `url`; `shared`: a directory
    both write to (the tally of runs, the sleep kind's files)."""

    url: str
    directory: Path
    instances: dict[str, Instance] = field(default_factory=dict)

    @property
    def shared(self) -> Path:
        return self.directory / "shared"

    def start(self, name: str, **overrides) -> Instance:
        home = self.directory / name
        home.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(exist_ok=True)
        bus = PrivateSystemBus.start(home / "bus")
        config = write_config(home, **{
            **overrides,
            "daemon": {"instance": name, **overrides.get("daemon", {})},
            "database": {"url": self.url, "lease_seconds": LEASE, "poll_interval": POLL,
                         **overrides.get("database", {})},
        })
        daemon = Hypervisord(config, bus.address)
        self.instances[name] = Instance(name, bus, daemon)
        daemon.start()
        return self.instances[name]

    def read(self, use: Callable[[Store], Awaitable[T]]) -> T:
        """`use(store)` on a store of its own, in an event loop of its own: the tests of a
        fleet are synchronous (its instances are processes)."""
        async def run() -> T:
            store = await open_store(self.url)
            try:
                return await use(store)
            finally:
                await store.close()
        return asyncio.run(run())

    def jobs(self) -> list[JobRecord]:
        return self.read(lambda store: store.list_jobs(limit=100_000))

    def tally(self) -> list[tuple[str, str]]:
        """(job id, instance) of every run of a "tally" job so far."""
        path = self.shared / "tally"
        return [tuple(line.split()) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def stop(self) -> None:
        for instance in self.instances.values():
            instance.daemon.stop()
            instance.bus.stop()


def tally_job(fleet: Fleet, **definition) -> dict:
    return {"file": str(fleet.shared / "tally"), **definition}
