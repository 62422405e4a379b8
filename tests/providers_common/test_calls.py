"""The provider skeleton's calls: one error-mapping hook, one retry policy, one task owner.

No real SDK fails on demand, so the SDK here is a fake: its exceptions are plain
classes that the fake provider's hook maps like a real one does (throttled ->
Retryable, gone -> NotFound). The providers' own suites exercise the real hooks
against moto, Azurite and the emulators.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypersdk.service.errors import Failed, HyperSDKError, InvalidArgument, NotFound, Retryable, \
    Unavailable
from hypersdk.service.providers.base import Provider
from hypersdk.service.providers.calls import MAX_RETRY_AFTER, RetryPolicy, TaskOwner
from hypersdk.service.providers.common import fetch_ranges, gather_bounded
from tests.support.fake_sink import FakeExportSink


class FakeThrottled(Exception):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("slow down")
        self.retry_after = retry_after


class FakeGone(Exception):
    pass


class FakeDropped(Exception):
    pass


class FakeProvider(Provider):
    kind = "fake"

    def __init__(self, retries: int = 2) -> None:
        super().__init__("fake", {}, None)
        self._retries = retries

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        if isinstance(exc, FakeThrottled):
            return Retryable(f"{what}: throttled", retry_after=exc.retry_after)
        if isinstance(exc, FakeGone):
            return NotFound(f"{what}: gone")
        if isinstance(exc, FakeDropped):
            return Unavailable(f"{what}: connection dropped")
        return None

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self._retries, first_delay=0)

    async def list_vms(self, vm_filter):
        raise NotImplementedError

    async def get_vm(self, identifier):
        raise NotImplementedError

    async def export_disks(self, identifier, target_dir, options, sink):
        raise NotImplementedError


def failing(*errors: Exception, result: str = "done"):
    """A blocking SDK call that raises `errors` one per call, then returns `result`."""
    pending = list(errors)
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return result
    return call, calls


async def test_fake_transient_errors_are_retried_until_the_call_succeeds():
    call, calls = failing(FakeThrottled(), FakeThrottled())
    assert await FakeProvider(retries=2).call("listing VMs", call) == "done"
    assert len(calls) == 3


async def test_fake_transient_errors_past_the_policy_raise_the_mapped_error():
    call, calls = failing(*[FakeThrottled() for _ in range(5)])
    with pytest.raises(Retryable, match="^listing VMs: throttled$"):
        await FakeProvider(retries=2).call("listing VMs", call)
    assert len(calls) == 3


async def test_a_fake_permanent_error_is_mapped_and_not_retried():
    call, calls = failing(FakeGone())
    with pytest.raises(NotFound, match="^instance i-1: gone$"):
        await FakeProvider().call("instance i-1", call)
    assert len(calls) == 1


async def test_an_exception_the_hook_does_not_know_propagates_as_it_is():
    call, calls = failing(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await FakeProvider().call("listing VMs", call)
    assert len(calls) == 1


async def test_guard_maps_without_retrying_for_sdks_that_retry_themselves():
    async def sdk_work():
        raise FakeThrottled()

    with pytest.raises(Retryable, match="^reading disk d1: throttled$"):
        await FakeProvider().guard("reading disk d1", sdk_work())


def test_the_wait_doubles_up_to_the_cap_and_a_servers_retry_after_wins():
    policy = RetryPolicy(retries=10, first_delay=0.5, max_delay=3.0)
    assert [policy.delay(n, Retryable("x")) for n in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 3, 3]
    assert policy.delay(1, Retryable("x", retry_after=7)) == 7
    assert policy.delay(1, Retryable("x", retry_after=10_000)) == MAX_RETRY_AFTER
    assert policy.attempts == 11


def test_the_default_policy_retries_export_max_retries_times():
    assert Provider.retry_policy.fget(FakeProvider()).retries == 3  # no config: the default


async def test_fake_dropped_reads_are_resumed_then_given_up_naming_the_offset(tmp_path: Path):
    sink = FakeExportSink()
    data = bytes(range(256)) * 16
    drops = {1024: 1}   # the read at byte 1024 drops once

    def read_range(offset: int, length: int) -> bytes:
        if drops.get(offset):
            drops[offset] -= 1
            raise FakeDropped()
        return data[offset:offset + length]

    provider = FakeProvider()
    await fetch_ranges(read_range, tmp_path / "disk.raw", len(data), chunk_size=1024,
                       max_retries=2, sink=sink, label="disk.raw",
                       map_error=provider.mapped("reading disk.raw"))
    assert (tmp_path / "disk.raw").read_bytes() == data
    assert sink.lines == ["warning: disk.raw: read at byte 1024 failed (reading disk.raw: "
                          "connection dropped), resuming (attempt 1/2)"]

    drops[2048] = 10
    with pytest.raises(Failed, match=r"^disk.raw: reading at byte 2048 failed 3 times "
                                     r"\(reading disk.raw: connection dropped\); giving up$"):
        await fetch_ranges(read_range, tmp_path / "again.raw", len(data), chunk_size=1024,
                           max_retries=2, sink=sink, label="disk.raw",
                           map_error=provider.mapped("reading disk.raw"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]  # no partial file


async def test_closing_the_owner_cancels_its_running_tasks_and_waits_for_them():
    ended: list[str] = []
    started = asyncio.Event()

    async def keepalive() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # an await inside the cleanup: close must wait it out
            ended.append("keepalive")

    async with TaskOwner() as owner:
        task = owner.create_task(keepalive())
        await started.wait()
    assert task.cancelled() and ended == ["keepalive"]
    with pytest.raises(RuntimeError, match="closed"):
        owner.create_task(keepalive())


async def test_the_first_failure_of_a_bounded_gather_cancels_and_awaits_the_others():
    ended: list[str] = []
    slow_started = asyncio.Event()

    async def work(item: str) -> str:
        if item == "bad":
            await slow_started.wait()
            raise Failed("disk bad broke")
        try:
            slow_started.set()
            await asyncio.Event().wait()
        finally:
            ended.append(item)
        return item

    with pytest.raises(Failed, match="disk bad broke"):
        await gather_bounded(["slow", "bad"], work, limit=2)
    assert ended == ["slow"]  # ended before the failure reached the caller


@pytest.mark.parametrize("module", ["gcp", "oci", "hyperv", "azure"])
async def test_providers_without_options_refuse_unknown_provider_options(module, tmp_path):
    """Before touching the cloud: a typo in options.provider_options is named, not ignored."""
    import importlib

    from hypersdk.service.model import ExportOptions

    cls = importlib.import_module(f"hypersdk.service.providers.{module}").PROVIDER_CLASS
    provider = cls("p", {"namespace": ""}, None)
    options = ExportOptions(extra={"keep_snapshot": True, "shutdown_timeout": 30.0})
    with pytest.raises(InvalidArgument) as info:
        await provider.export_disks("vm1", tmp_path, options, FakeExportSink())
    assert (info.value.field, info.value.rule) == ("options.provider_options.keep_snapshot",
                                                   "unknown field (known: none)")
