"""Job kinds that exist only to exercise the engine; they are never in the product.

- "sleep": lands a file `<job id>.partial` in the definition's "dir" through a staging
  directory (as every job writes), advances progress in steps of "step_bytes" every
  "interval" seconds for "steps" steps.
- "slotted-sleep": "sleep" that waits for an export slot (export.concurrent_exports).
- "fail": fails at once with the definition's "message".
- "flaky": raises Retryable until attempt "succeed_on".
- "logflood": emits "lines" log lines (plus "padding" bytes each) in one burst.
- "crash": raises an exception no job kind should (a bug), not a HyperSDKError.
- "replaced-then-fail": lands `<job id>.partial` in "dir", which someone else then
  replaces with a file of their own, and fails.
- "tally": appends "<job id> <daemon.instance>" to the definition's "file" (a line per
  run, so a test sees which instance ran each job and whether any ran twice), then
  sleeps "steps" x "interval" seconds, advancing progress.
- "flaky-writer": lands `<job id>-<attempt>.partial` in "dir" on every attempt, raises
  Retryable until attempt "succeed_on", then returns the .partial files it finds there.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from hypersdk.service.confine import open_dir
from hypersdk.service.errors import Failed, InvalidArgument, Retryable
from hypersdk.service.job_kinds import JobKind, register

TEST_ACTION = "org.hypersdk.HyperSDK1.export"


class _TestKind(JobKind):
    operation = "test"
    polkit_action = TEST_ACTION
    fields: dict = {}

    def validate(self, definition, submit) -> dict:
        if not isinstance(definition, dict):
            raise InvalidArgument("definition", "must be a JSON object")
        for key in definition:
            if key not in self.fields:
                raise InvalidArgument(key, "unknown field")
        return {key: definition.get(key, default) for key, default in self.fields.items()}


class SleepKind(_TestKind):
    name = "sleep"
    fields = {"dir": "", "steps": 10, "interval": 0.1, "step_bytes": 1 << 20}

    async def run(self, ctx) -> dict:
        ctx.set_stage("sleeping")
        ctx.set_total(self._total(ctx.definition))
        if ctx.definition["dir"]:
            dest = open_dir(Path(ctx.definition["dir"]), "", "dir", create=False)
            staging = ctx.staging(dest)
            staging.write(f"{ctx.job_id}.partial", b"partial")
            staging.land(f"{ctx.job_id}.partial")
        for step in range(ctx.definition["steps"]):
            await asyncio.sleep(ctx.definition["interval"])
            ctx.advance(ctx.definition["step_bytes"])
            ctx.log(f"step {step + 1}")
        return {"steps": ctx.definition["steps"]}

    @staticmethod
    def _total(definition: dict) -> int:
        return definition["steps"] * definition["step_bytes"]


class SlottedSleepKind(SleepKind):
    """"sleep" that takes one of the engine's export slots, as exports do."""
    name = "slotted-sleep"
    export_slot = True


class FailKind(_TestKind):
    name = "fail"
    fields = {"message": "it failed"}

    async def run(self, ctx) -> dict:
        raise Failed(ctx.definition["message"])


class FlakyKind(_TestKind):
    name = "flaky"
    fields = {"succeed_on": 2}

    async def run(self, ctx) -> dict:
        attempt = ctx.attempt
        if attempt < ctx.definition["succeed_on"]:
            raise Retryable(f"transient failure on attempt {attempt}")
        return {"attempt": attempt}


class LogFloodKind(_TestKind):
    name = "logflood"
    fields = {"lines": 1000, "padding": 0}

    async def run(self, ctx) -> dict:
        """All lines in one burst, never yielding: the bus socket fills up."""
        padding = "x" * ctx.definition["padding"]
        for i in range(ctx.definition["lines"]):
            ctx.log(f"line {i} {padding}")
            ctx.advance(1)
        return {"lines": ctx.definition["lines"]}


class CrashKind(_TestKind):
    name = "crash"

    async def run(self, ctx) -> dict:
        raise RuntimeError("a bug in a job kind")


class ReplacedThenFailKind(_TestKind):
    name = "replaced-then-fail"
    fields = {"dir": ""}

    async def run(self, ctx) -> dict:
        directory = Path(ctx.definition["dir"])
        staging = ctx.staging(open_dir(directory, "", "dir", create=False))
        staging.write(f"{ctx.job_id}.partial", b"partial")
        staging.land(f"{ctx.job_id}.partial")
        theirs = directory / "theirs.tmp"
        theirs.write_bytes(b"someone else's")
        theirs.replace(directory / f"{ctx.job_id}.partial")
        raise Failed("it failed after its file was replaced")


class FlakyWriterKind(_TestKind):
    name = "flaky-writer"
    fields = {"dir": "", "succeed_on": 2}

    async def run(self, ctx) -> dict:
        directory = Path(ctx.definition["dir"])
        staging = ctx.staging(open_dir(directory, "", "dir", create=False))
        staging.write(f"{ctx.job_id}-{ctx.attempt}.partial", b"partial")
        staging.land(f"{ctx.job_id}-{ctx.attempt}.partial")
        if ctx.attempt < ctx.definition["succeed_on"]:
            raise Retryable(f"transient failure on attempt {ctx.attempt}")
        return {"found": sorted(path.name for path in directory.glob("*.partial"))}


class TallyKind(_TestKind):
    name = "tally"
    fields = {"file": "", "steps": 1, "interval": 0.05}

    async def run(self, ctx) -> dict:
        with open(ctx.definition["file"], "a") as tally:
            tally.write(f"{ctx.job_id} {ctx.config.daemon.instance}\n")
        ctx.set_total(ctx.definition["steps"])
        for _ in range(ctx.definition["steps"]):
            await asyncio.sleep(ctx.definition["interval"])
            ctx.advance(1)
        return {"instance": ctx.config.daemon.instance}


for kind in (SleepKind(), SlottedSleepKind(), FailKind(), FlakyKind(), LogFloodKind(),
             CrashKind(), ReplacedThenFailKind(), FlakyWriterKind(), TallyKind()):
    register(kind)
