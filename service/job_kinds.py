"""The one small interface every kind of job implements, and the registry of kinds.

A kind validates a definition when it is submitted (so bad input never becomes a
job) and runs it later with a JobContext that reports progress and log lines and
gives it staging directories: everything a job writes lands through one, and is
removed again if the job fails or is cancelled. Cancellation arrives
as asyncio.CancelledError at the next await; a kind must not swallow it.

The export, convert and import kinds live in `jobs/`; kinds used only to
exercise the engine live in `tests/`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

    from .config import Config
    from .confine import OpenDir
    from .model import DownloadCheckpoints
    from .staging import Staging
    from .providers.registry import ProviderRegistry


class JobContext(Protocol):
    """What a running job sees of the engine."""

    job_id: str
    definition: dict
    config: "Config"
    providers: "ProviderRegistry"
    attempt: int  # 1 for the first run, 2 for the first retry, ...
    checkpoints: "DownloadCheckpoints | None"  # where downloads record how far they got
    cutover: "asyncio.Event"  # set by a Cutover call (warm exports: jobs/warm.py)

    def log(self, message: str, level: str = "info") -> None: ...
    def set_stage(self, stage: str) -> None: ...
    def set_total(self, nbytes: int) -> None: ...
    def add_total(self, nbytes: int) -> None: ...
    def plan(self, stages: dict[str, int]) -> None:
        """Bytes each coming stage will add, estimated at the start (progress.py)."""
    def advance(self, nbytes: int) -> None: ...
    def set_done(self, nbytes: int) -> None: ...
    def record_domain(self, uri: str, uuid: str, console_log: "Path | None") -> None:
        """Call before defining a libvirt domain: unless the job completes, it is
        stopped and undefined again and its console log removed (even after a crash:
        job_output.py)."""
    def record_volume(self, uri: str, pool: str, name: str) -> None:
        """Call before creating a storage volume: unless the job completes, it is deleted
        again (even after a crash: job_output.py)."""
    def forget_volume(self, uri: str, pool: str, name: str) -> None:
        """The volume recorded was not created (its name was taken): never delete it."""
    def staging(self, dest: "OpenDir") -> "Staging":
        """A private directory in `dest` (which it takes over) for the job's files, which
        land in `dest` from there. If the job does not complete, what landed and the
        staging directory are removed again (service/staging.py)."""


class SubmitContext(Protocol):
    """What a kind may consult while validating a definition."""

    config: "Config"
    providers: "ProviderRegistry"


class JobKind(ABC):
    name: ClassVar[str]            # "export", "convert", "import", ...
    operation: ClassVar[str]       # shown as the Job's Operation property
    polkit_action: ClassVar[str]   # the action a caller needs to submit it
    export_slot: ClassVar[bool] = False  # counts against export.concurrent_exports

    @abstractmethod
    def validate(self, definition: Any, submit: SubmitContext) -> dict:
        """Return the normalised definition or raise InvalidArgument(field, rule)."""

    @abstractmethod
    async def run(self, ctx: JobContext) -> dict:
        """Do the work; return the result (JSON-serialisable, no secrets)."""

    def describe(self, definition: dict) -> dict:
        """Summary columns for listings: vm, provider (override when they exist)."""
        return {"vm": str(definition.get("vm_identifier") or definition.get("vm_name") or ""),
                "provider": str(definition.get("provider") or "")}


_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind | None:
    return _KINDS.get(name)


def kind_names() -> list[str]:
    return sorted(_KINDS)
