"""`hypervisord`: start-up, readiness, and a draining shutdown.

Order matters: the config is checked in full before anything is touched; the store is
opened (and migrated) and interrupted jobs are recovered; the objects are exported and
only then is the bus name owned, so a client that sees the name sees the objects;
READY=1 goes to systemd only after the name is owned and the store is open.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import pwd
import signal
import sys
from pathlib import Path

import sdnotify

from hypersdk.client.names import ROOT_PATH

from . import __version__
from .allocator import keep_heap_padding
from .automation import Automation
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .dbus.bus import connect
from .dbus.service import DBusService
from .engine import JobEngine
from .errors import Failed, HyperSDKError
from .fleet import Fleet
from .plans import Plans
from .providers.registry import ProviderRegistry
from .store import open_store

log = logging.getLogger("hypervisord")

# Modules whose import registers the product's job kinds.
JOB_KIND_MODULES = (
    "hypersdk.service.jobs.export",
    "hypersdk.service.jobs.convert_job",
    "hypersdk.service.jobs.import_job",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hypervisord", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None,
                        help=f"config file (default {DEFAULT_CONFIG_PATH} if it exists)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file and exit")
    parser.add_argument("--bus", default="system",
                        help="system (default; honours DBUS_SYSTEM_BUS_ADDRESS), session, "
                             "or a D-Bus address")
    parser.add_argument("--version", action="version", version=f"hypervisord {__version__}")
    return parser.parse_args(argv)


def bridge_uids(config: Config) -> frozenset[int]:
    """The users whose calls may name a REST user to act for: root and api.bridge_user."""
    try:
        return frozenset({0, pwd.getpwnam(config.api.bridge_user).pw_uid})
    except KeyError:
        log.warning("api.bridge_user %r does not exist: REST calls are taken only from root",
                    config.api.bridge_user)
        return frozenset({0})


def load_job_kinds() -> None:
    for module in JOB_KIND_MODULES:
        importlib.import_module(module)


class Daemon:
    def __init__(self, config: Config, bus_spec: str) -> None:
        self.config = config
        self.bus_spec = bus_spec
        self.notifier = sdnotify.SystemdNotifier()
        self.stopping = asyncio.Event()

    def status(self, text: str) -> None:
        self.notifier.notify(f"STATUS={text}")
        log.info(text)

    async def run(self) -> None:
        database = self.config.database
        store = await open_store(database.url or f"sqlite://{database.path}",
                                 database.connect_timeout, database.statement_timeout)
        providers = ProviderRegistry(self.config)
        engine = JobEngine(store, self.config, providers)
        try:
            bus = await connect(self.bus_spec, manager_path=ROOT_PATH)
        except OSError as exc:
            await store.close()
            raise Failed(f"cannot connect to the {self.bus_spec} bus: "
                         f"{exc.strerror or exc} (is dbus running?)") from exc
        automation = Automation(store, engine, self.config)
        plans = Plans(store, engine, self.config)
        fleet = Fleet(engine)
        fleet.on_instance_lost.append(plans.take_over)
        service = DBusService(bus, engine, automation, bridge_uids(self.config), plans)
        try:
            await automation.load()
            await service.export_all()
            await service.own_name()
            await engine.start()
            await fleet.start()
            await plans.resume()
            await automation.start()
            self.notifier.notify("READY=1")
            self.status(f"hypervisord {__version__} ready; store {store.path}")
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stopping.set)
            bus_lost = asyncio.create_task(bus.wait_for_disconnect())
            stop = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait({bus_lost, stop}, return_when=asyncio.FIRST_COMPLETED)
            if bus_lost in done:
                raise HyperSDKError("lost the connection to the bus")
            stop.cancel()
            bus_lost.cancel()
            self.notifier.notify("STOPPING=1")
            self.status("stopping: no new jobs; interrupting running jobs")
            await automation.stop()
            await fleet.stop()
            await engine.shutdown()
        finally:
            await service.close()
            await providers.close()
            bus.disconnect()
            await store.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG_PATH.exists():
        config_path = DEFAULT_CONFIG_PATH
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.check_config:
        print(f"config: {config.source}: ok")
        return 0
    logging.basicConfig(level=config.daemon.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    load_job_kinds()
    keep_heap_padding()
    try:
        asyncio.run(Daemon(config, args.bus).run())
    except HyperSDKError as exc:
        log.error("%s", exc.message)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
