"""hyper2kvm unit check against python-dbusmock's systemd, and the output watcher."""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from pathlib import Path

import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.jobs.hyper2kvm import reported_failure, unit_state, wait_for_output


def instance() -> str:
    return "inst-" + uuid.uuid4().hex[:6]


async def test_dbusmock_active_unit_is_active(dbusmock_systemd):
    name = instance()
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "active")
    state = await unit_state(name, dbusmock_systemd.address)
    assert state.active and state.unit == f"hyper2kvm@{name}.service"


async def test_dbusmock_failed_unit_is_not_active(dbusmock_systemd):
    name = instance()
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "failed")
    state = await unit_state(name, dbusmock_systemd.address)
    assert not state.active
    assert state.describe() == f"hyper2kvm@{name}.service is failed"


async def test_dbusmock_unknown_unit_says_systemd_does_not_know_it(dbusmock_systemd):
    state = await unit_state("never-installed", dbusmock_systemd.address)
    assert not state.active
    assert "systemd does not know the unit" in state.reason
    assert "Traceback" not in state.reason


async def test_bus_address_comes_from_the_environment(dbusmock_systemd, monkeypatch):
    name = instance()
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "active")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    assert (await unit_state(name)).active


async def test_no_bus_is_not_active_with_a_reason(tmp_path):
    state = await unit_state("x", f"unix:path={tmp_path}/no-bus")
    assert not state.active
    assert "cannot reach systemd on the system bus" in state.describe()


async def test_output_is_returned_once_present_and_stable(tmp_path):
    expected = [tmp_path / "vm" / "disk-1.qcow2", tmp_path / "vm" / "disk-2.qcow2"]

    async def converter() -> None:
        await asyncio.sleep(0.05)
        expected[0].parent.mkdir()
        for path in expected:
            path.write_bytes(b"x" * 100)
        await asyncio.sleep(0.05)
        with open(expected[1], "ab") as handle:  # still growing
            handle.write(b"y" * 100)

    lines: list[str] = []
    task = asyncio.create_task(converter())
    found = await wait_for_output(expected, poll_interval=0.02, timeout=5, since=time.time(),
                                  log=lines.append)
    await task
    assert found == expected
    assert expected[1].stat().st_size == 200
    assert len(lines) == 1 and "waiting for hyper2kvm output" in lines[0]


async def test_timeout_names_the_missing_files_and_the_setting(tmp_path):
    present = tmp_path / "a.qcow2"
    present.write_bytes(b"x")
    missing = tmp_path / "b.qcow2"
    with pytest.raises(Failed, match=rf"within 0.1 s \(hyper2kvm.job_timeout\); missing: {missing}"):
        await wait_for_output([present, missing], poll_interval=0.02, timeout=0.1,
                              since=time.time())


def hyper2kvm_report(directory: Path, success: bool, errors: list[dict]) -> Path:
    """A report.json shaped like hyper2kvm 0.2.1's ManifestReporter writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    report = directory / "report.json"
    report.write_text(json.dumps({"pipeline": {"success": success, "stages": {},
                                               "duration_seconds": 1.0},
                                  "errors": errors, "warnings": []}))
    return report


async def test_a_failure_report_ends_the_wait_with_hyper2kvms_error(tmp_path):
    since = time.time()
    hyper2kvm_report(tmp_path / "vm", False, [{"stage": "convert", "message": "No space left",
                                               "timestamp": "2026-01-01T00:00:00"}])
    started = time.monotonic()
    with pytest.raises(Failed, match=r"hyper2kvm failed .*report.json\): stage convert: "
                                     "No space left"):
        await wait_for_output([tmp_path / "vm" / "d.qcow2"], poll_interval=0.02, timeout=30,
                              since=since)
    assert time.monotonic() - started < 5


async def test_a_report_from_an_earlier_run_is_ignored(tmp_path):
    report = hyper2kvm_report(tmp_path / "vm", False, [{"stage": "convert", "message": "old"}])
    os.utime(report, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(Failed, match="no finished output within"):
        await wait_for_output([tmp_path / "vm" / "d.qcow2"], poll_interval=0.02, timeout=0.1,
                              since=time.time() - 60)


@pytest.mark.parametrize("content", ["{half", "[]", '{"pipeline": {"success": true}}'])
def test_unreadable_or_successful_reports_are_not_failures(tmp_path, content):
    report = tmp_path / "report.json"
    report.write_text(content)
    assert reported_failure(report, 0) is None


async def test_a_bus_without_systemd_says_so(system_bus):
    state = await unit_state("vsphere", system_bus.address)
    assert not state.active
    assert state.reason.startswith("systemd is not on the system bus")
