"""FakeJobContext: what the job engine gives a running kind, for tests and the benchmark.

It records log lines, stages and progress, and gives the kind real staging
directories (service/staging.py) whose records it keeps in memory instead of the
store: `fail()` discards them and `succeed()` keeps what landed, as the engine does.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypersdk.service.confine import OpenDir
from hypersdk.service.staging import JobStagings, OwnedPath, Staging


@dataclass
class FakeSubmitContext:
    config: object
    providers: object


@dataclass
class FakeJobContext:
    definition: dict
    config: object
    providers: object
    job_id: str = "job-test"
    attempt: int = 1
    checkpoints: None = None  # no resume here (tests/e2e/test_kill9.py tests it)
    cutover: asyncio.Event = field(default_factory=asyncio.Event)  # a warm export's Cutover
    lines: list[tuple[str, str]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    total: int = 0
    done: int = 0
    done_history: list[int] = field(default_factory=list)  # every value `done` took
    stagings: JobStagings = field(default_factory=JobStagings)
    owned: list[OwnedPath] = field(default_factory=list)  # what the store would hold
    planned: dict[str, int] = field(default_factory=dict)  # the last plan(stages)
    domains: list[tuple[str, str]] = field(default_factory=list)  # (uri, uuid) defined
    volumes: list[tuple[str, str, str]] = field(default_factory=list)  # (uri, pool, name)

    @property
    def messages(self) -> list[str]:
        return [message for _level, message in self.lines]

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append((level, message))

    def set_stage(self, stage: str) -> None:
        self.stages.append(stage)

    def set_total(self, nbytes: int) -> None:
        self.total = nbytes

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def plan(self, stages: dict[str, int]) -> None:
        self.planned = dict(stages)

    def advance(self, nbytes: int) -> None:
        self.set_done(self.done + nbytes)

    def set_done(self, nbytes: int) -> None:
        self.done = nbytes
        self.done_history.append(nbytes)

    def staging(self, dest: OpenDir) -> Staging:
        return self.stagings.create(dest, self.job_id, self)

    def record_domain(self, uri: str, uuid: str, console_log) -> None:
        self.domains.append((uri, uuid))

    def record_volume(self, uri: str, pool: str, name: str) -> None:
        self.volumes.append((uri, pool, name))

    def forget_volume(self, uri: str, pool: str, name: str) -> None:
        self.volumes.remove((uri, pool, name))

    def record(self, owned: OwnedPath) -> None:
        self.owned.append(owned)

    def forget(self, owned: OwnedPath) -> None:
        self.owned.remove(owned)

    def fail(self) -> None:
        for problem in self.stagings.discard():
            self.log(problem, "warning")

    def succeed(self) -> None:
        self.stagings.keep()

    def text(self) -> str:
        return "\n".join(message for _, message in self.lines)


def job_context(kind, body: dict, config, registry, **fields) -> FakeJobContext:
    """The context of a job whose `body` the kind has checked, as SubmitJob would."""
    definition = kind.validate(body, FakeSubmitContext(config, registry))
    return FakeJobContext(definition, config, registry, **fields)


async def run_job(kind, ctx: FakeJobContext) -> dict:
    """Run a kind like the engine: on any failure, remove what it made; else keep it."""
    try:
        result = await kind.run(ctx)
    except BaseException:
        ctx.fail()
        raise
    ctx.succeed()
    return result
