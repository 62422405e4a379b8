"""Fixtures: an in-process engine on a real store (SQLite, or PostgreSQL by database.url),
a fake clock, a real HTTP receiver, a simulator with tagged VMs, and the "fake_export" kind
for backup-policy edge cases."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from pyVmomi import vim

from hypersdk.service.config import parse_config
from hypersdk.service.engine import JobEngine
from hypersdk.service.confine import open_dir
from hypersdk.service.errors import Failed, InvalidArgument
from hypersdk.service.job_kinds import JobKind, register
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.store import Store, open_store

from ..support import test_kinds  # noqa: F401  (registers sleep, fail, ...)
from ..support.wait import job_is, until
from ..vcsim.harness import Simulator, find_vm, give_disks

PRODUCTION = ["DC0_H0_VM0", "DC0_C0_RP0_VM1"]  # simulator VMs tagged backup=production


class FakeExportKind(JobKind):
    """Stands in for the export kind: writes one small file into export_path."""

    name = "fake_export"
    operation = "export"
    polkit_action = "org.hypersdk.HyperSDK1.export"
    export_slot = True

    def validate(self, definition, submit) -> dict:
        for key in definition:
            if key not in ("vm_identifier", "provider", "export_path", "compress", "fail"):
                raise InvalidArgument(key, "unknown field")
        return dict(definition)

    async def run(self, ctx) -> dict:
        target = Path(ctx.definition["export_path"])
        staging = ctx.staging(open_dir(target.parent, target.name, "export_path", create=True))
        staging.write("disk.img", os.urandom(4096))
        staging.land("disk.img")
        if ctx.definition.get("fail") == ctx.definition["vm_identifier"]:
            raise Failed("simulated export failure")
        return {"path": str(target)}


register(FakeExportKind())


class FakeClock:
    """A clock the test moves by hand (the scheduler's injectable clock)."""

    def __init__(self, now: float) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_config(tmp_path: Path, **sections):
    document = {"export": {"base_path": str(tmp_path / "exports"), "max_retries": 0},
                "database": {"path": str(tmp_path / "state" / "hypersdk.db")},
                "automation": {"missed_run_grace": "10m", "webhook_retry_base": 0.2,
                               "webhook_timeout": 2, "webhook_max_attempts": 6}}
    for name, values in sections.items():
        document.setdefault(name, {})
        if isinstance(values, dict) and isinstance(document[name], dict):
            document[name].update(values)
        else:
            document[name] = values
    return parse_config(document, "(test)", env={})


@dataclass
class EngineEnv:
    config: object
    store: Store
    engine: JobEngine
    providers: ProviderRegistry

    async def wait_job(self, job_id: str, timeout: float = 10) -> str:
        await until(lambda: job_is(self.engine, job_id, lambda job: job.finished), timeout,
                    f"{job_id} to finish")
        return (await self.engine.get(job_id)).status


async def start_engine(config) -> EngineEnv:
    store = await open_store(config.database.url or f"sqlite://{config.database.path}")
    providers = ProviderRegistry(config)
    engine = JobEngine(store, config, providers)
    await engine.start()
    return EngineEnv(config, store, engine, providers)


async def stop_engine(env: EngineEnv) -> None:
    await env.engine.shutdown()
    await env.providers.close()
    await env.store.close()


@pytest.fixture
async def env(tmp_path, database_url):
    """An engine on each store (SQLite, PostgreSQL)."""
    environment = await start_engine(make_config(tmp_path, database={"url": database_url}))
    yield environment
    await stop_engine(environment)


@dataclass
class Received:
    event: str
    body: bytes
    headers: dict

    @property
    def payload(self) -> dict:
        return json.loads(self.body)

    def signature_ok(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("X-HyperSDK-Signature", ""))


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 recording every POST; `answers` are consumed first."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    default_status: int = 200
    received: list[Received] = field(default_factory=list)   # answered 2xx
    attempts: list[Received] = field(default_factory=list)   # every request
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        item = Received(request.headers.get("X-HyperSDK-Event", ""), await request.read(),
                        dict(request.headers))
        self.attempts.append(item)
        status = self.answers.pop(0) if self.answers else self.default_status
        if 200 <= status < 300:
            self.received.append(item)
        self.arrived.set()
        return web.Response(status=status, text="ok")

    async def wait_for(self, count: int, timeout: float = 15, event: str | None = None
                       ) -> list[Received]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            got = [r for r in self.received if event is None or r.event == event]
            if len(got) >= count:
                return got
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"received {[r.event for r in self.received]}, wanted "
                                     f"{count} x {event or 'any'}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass


@pytest.fixture
async def receiver():
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    recv.url = f"http://127.0.0.1:{port}/hook"
    yield recv
    await runner.cleanup()


@pytest.fixture(scope="module")
def tagged_sim(tmp_path_factory, vcsim_binary):
    """A simulator with four VMs: two tagged backup=production (with a 2 MiB disk of real
    content each), one backup=dev."""
    with Simulator() as simulator:
        si = simulator.connect()
        fields = si.content.customFieldsManager
        field = fields.AddCustomFieldDef(name="backup", moType=vim.VirtualMachine)
        uploads = tmp_path_factory.mktemp("uploads")
        for seed, name in enumerate(PRODUCTION):
            fields.SetField(entity=find_vm(si, name), key=field.key, value="production")
            give_disks(simulator, si, name, [2 << 20], uploads, seed=seed)
        fields.SetField(entity=find_vm(si, "DC0_H0_VM1"), key=field.key, value="dev")
        yield simulator
