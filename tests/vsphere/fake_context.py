"""FakeJobContext: what the job engine gives a running kind, for tests and the benchmark.

It records log lines, stages and progress, and on `fail()` removes the paths a
kind registered with add_cleanup, as the engine does when a job fails.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


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
    lines: list[tuple[str, str]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    total: int = 0
    done: int = 0
    done_history: list[int] = field(default_factory=list)  # every value `done` took
    cleanup: list[Path] = field(default_factory=list)

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

    def advance(self, nbytes: int) -> None:
        self.set_done(self.done + nbytes)

    def set_done(self, nbytes: int) -> None:
        self.done = nbytes
        self.done_history.append(nbytes)

    def add_cleanup(self, path: Path) -> None:
        self.cleanup.append(Path(path))

    def keep(self, path: Path) -> None:
        self.cleanup = [p for p in self.cleanup if p != Path(path)]

    def fail(self) -> None:
        for path in reversed(self.cleanup):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def text(self) -> str:
        return "\n".join(message for _, message in self.lines)


def job_context(kind, body: dict, config, registry, **fields) -> FakeJobContext:
    """The context of a job whose `body` the kind has checked, as SubmitJob would."""
    definition = kind.validate(body, FakeSubmitContext(config, registry))
    return FakeJobContext(definition, config, registry, **fields)


async def run_job(kind, ctx: FakeJobContext) -> dict:
    """Run a kind like the engine: on any failure, remove what it registered for cleanup."""
    try:
        return await kind.run(ctx)
    except BaseException:
        ctx.fail()
        raise
