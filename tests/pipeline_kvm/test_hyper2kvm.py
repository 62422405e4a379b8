"""hyper2kvm unit check against python-dbusmock's systemd (a named fake: no systemd here),
and reading the daemon's markers (the real daemon runs in test_handoff.py)."""
from __future__ import annotations

import uuid

import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.jobs.hyper2kvm import follow, read_marker, unit_state


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


async def test_timeout_says_where_each_manifest_is_and_names_the_setting(tmp_path):
    for name, where in [("a.json", "to_be_processed"), ("b.json", "processing")]:
        (tmp_path / where).mkdir()
        (tmp_path / where / name).write_text("{}")
    lines: list[str] = []
    with pytest.raises(Failed, match=r"did not finish within 0.1 s \(hyper2kvm.job_timeout\): "
                                     r"a.json still waiting in to_be_processed/ \(is the daemon "
                                     r"running\?\); b.json still being processed"):
        await follow(tmp_path, tmp_path / "out", ["a.json", "b.json"], poll_interval=0.02,
                     timeout=0.1, log=lines.append, on_done=lambda *_: None)
    assert lines[0].startswith(f"following hyper2kvm in {tmp_path}")
    assert lines[1:] == ["hyper2kvm took b.json"]


@pytest.mark.parametrize("content", ["{half", "[]"])
def test_an_error_file_still_being_written_is_not_yet_a_failure(tmp_path, content):
    (tmp_path / "failed" / "2026-12-07").mkdir(parents=True)
    (tmp_path / "failed" / "2026-12-07" / "m.json.error.json").write_text(content)
    (tmp_path / "processing").mkdir()
    (tmp_path / "processing" / "m.json").write_text("{}")
    assert read_marker(tmp_path, "m.json").state == "processing"


async def test_a_bus_without_systemd_says_so(system_bus):
    state = await unit_state("vsphere", system_bus.address)
    assert not state.active
    assert state.reason.startswith("systemd is not on the system bus")
