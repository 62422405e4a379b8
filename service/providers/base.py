"""What every source of VMs offers: discovery, details, and an export of the disks.

A provider is plain asyncio code with no D-Bus in it. Blocking SDK calls run in a
thread (`asyncio.to_thread`). The export job (`jobs/export.py`) calls
`export_disks`, then packages the result (OVF/OVA, manifest, conversion).
SDKs are imported lazily inside the provider so that a missing extra is a clear
`Unavailable` error naming the extra, not an ImportError at start. What an export makes
in the cloud or changes (a snapshot, a grant, a stopped VM) is registered as it goes in
one `cleanup.Cleanups` list, which undoes it all however the export ends.

A provider fills in `map_error` (its SDK's exceptions as the service's errors) and
calls its SDK through `call` (a blocking call in a thread, transient failures retried
by `retry_policy`) or `guard` (an awaitable whose SDK retries on its own); see
`calls.py`. Waiting for a cloud operation is `common.poll_until`.
"""
from __future__ import annotations

import asyncio
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, TypeVar

from ..errors import HyperSDKError, Unavailable
from ..model import DiskInfo, ExportedDisk, ExportOptions, ExportSink, VMInfo
from .calls import RetryPolicy, with_retries

if TYPE_CHECKING:
    from ..config import Config

T = TypeVar("T")


class WarmSource(Protocol):
    """One VM's disks as warm migration reads them (`jobs/warm.py` drives it).

    A round is: `create_snapshot(name)`, then per disk `changed_extents` and `read` of
    those extents, then `remove_snapshots(prefix, keep)`. Before the first round
    `remove_snapshots(prefix, keep)` clears what an interrupted run left (none: no
    error). `keep` holds the change ids the images are at: where a change id is itself a
    snapshot (AWS: the next round diffs against it), that snapshot stays; `close`
    removes those this source made. `shut_down` stops the VM at cutover.
    """

    vm: VMInfo

    async def create_snapshot(self, name: str) -> None: ...

    async def changed_extents(self, disk: DiskInfo,
                              since: str | None) -> tuple[list[tuple[int, int]], str]:
        """(offset, length) of the disk's data in the current snapshot that changed since
        the change id `since` (None: every extent holding data), and the snapshot's own
        change id (the next round's `since`)."""

    async def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        """`length` bytes of the current snapshot's disk at `offset`."""

    async def remove_snapshots(self, prefix: str, keep: frozenset[str] = frozenset()) -> None:
        """Remove every snapshot of the VM whose name starts with `prefix`, but a
        snapshot that is one of the change ids in `keep`."""

    async def shut_down(self) -> None: ...

    async def close(self) -> None: ...


class Provider(ABC):
    """One configured source, e.g. `providers.vsphere` in the config."""

    kind: str = ""
    # why this provider cannot do warm migration ("": it can, through warm_source)
    warm_unsupported: str = "it has no changed-block interface wired to warm migration yet"

    def __init__(self, name: str, settings: dict, config: "Config") -> None:
        self.name = name
        self.settings = settings
        self.config = config

    @abstractmethod
    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        """VMs that match the filter (keys depend on the provider; unknown keys are refused)."""

    @abstractmethod
    async def get_vm(self, identifier: str) -> VMInfo:
        """One VM by id, name or path; NotFound names the closest matches."""

    @abstractmethod
    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        """Write the VM's disks into target_dir (streamed, checked), return what was written.

        Files land by write-then-rename. On failure or cancellation nothing partial
        is left behind in target_dir.
        """

    async def warm_source(self, identifier: str, options: ExportOptions,
                          sink: ExportSink) -> WarmSource:
        """The VM's disks for warm migration (providers whose warm_unsupported is "")."""
        raise Unavailable(f"provider {self.name!r} cannot do warm migration: "
                          f"{self.warm_unsupported}")

    async def close(self) -> None:
        """Release sessions and connections."""

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """The hook: `exc` from the SDK as one of the service's errors, its message saying
        `what` failed; None for an exception that is not the SDK's (it propagates as is).
        A `Retryable` is what `retry_policy` tries again."""
        return None

    @property
    def retry_policy(self) -> RetryPolicy:
        """Transient failures are tried again `export.max_retries` times."""
        return RetryPolicy(retries=int(self.config.export.max_retries) if self.config else 3)

    def mapped(self, what: str) -> Callable[[Exception], BaseException]:
        """`map_error` for `what`, leaving the service's own errors and unknown ones alone."""
        def apply(exc: Exception) -> BaseException:
            if isinstance(exc, HyperSDKError):
                return exc
            return self.map_error(exc, what) or exc
        return apply

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` (blocking) in a thread, retried by `retry_policy`, its
        errors mapped."""
        return await with_retries(lambda: asyncio.to_thread(fn, *args, **kwargs),
                                  self.retry_policy, self.mapped(what))

    async def guard(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await SDK work that retries on its own (so: once); its errors mapped."""
        return await with_retries(lambda: awaitable, RetryPolicy(retries=0), self.mapped(what))


def require_extra(module_name: str, extra: str) -> Any:
    """Import an optional SDK or raise Unavailable naming the extra to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise Unavailable(
            f"the {extra} provider needs the Python package {module_name.split('.')[0]!r}: "
            f"install it with `pip install hypersdk[{extra}]` ({exc})") from exc
