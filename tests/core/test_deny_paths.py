"""The paths that refuse: polkitd unreachable, polkit asking for authentication, a caller
whose uid the bus cannot tell, arguments of the wrong types, a second hypervisord."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from hypersdk.client.bus import connect
from hypersdk.service.dbus.polkit import UNKNOWN_UID, AccessDenied, Authority, Caller

from ..support.cli import (BUS_NAME, MANAGER, MANAGER_IFACE, busctl, gdbus_call, gdbus_submit,
                           job_property, submit)
from ..support.hypervisord import Hypervisord, write_config
from ..support.system import MEMBER, OUTSIDER, PrivateSystemBus, start_polkitd, stop_process

# polkit's answer for the outsider: an administrator's password would do (not "no")
CHALLENGE_RULE = """polkit.addRule(function (action, subject) {
    if (action.id == "org.hypersdk.HyperSDK1.view" && subject.user == "%s") {
        return polkit.Result.AUTH_ADMIN;
    }
    return polkit.Result.NOT_HANDLED;
});
""" % OUTSIDER


@pytest.fixture
def bus_without_polkitd():
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-bus-"))
    bus = PrivateSystemBus.start(directory)
    yield bus
    bus.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def bus_with_challenging_polkitd(bus_without_polkitd):
    """A bus of its own whose real polkitd also has CHALLENGE_RULE."""
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-polkit-"))
    (directory / "rules.d").mkdir()
    (directory / "rules.d" / "40-test-challenge.rules").write_text(CHALLENGE_RULE)
    process = start_polkitd(bus_without_polkitd, directory)
    yield bus_without_polkitd
    stop_process(process)
    shutil.rmtree(directory, ignore_errors=True)


def test_without_polkitd_every_unprivileged_call_is_refused_saying_why(
        bus_without_polkitd, users, service_dir):
    daemon = Hypervisord(write_config(service_dir), bus_without_polkitd.address)
    daemon.start()
    try:
        refused = gdbus_submit(bus_without_polkitd.address, {"steps": 1}, kind="sleep",
                               user=MEMBER)
        assert refused.returncode != 0
        assert ("AccessDenied: not authorized for org.hypersdk.HyperSDK1.export: the polkit "
                "check failed") in refused.stderr
        # root needs no polkit answer
        path = json.loads(submit(bus_without_polkitd.address, {"steps": 1}, kind="sleep")
                          .stdout.split()[1])
        assert path.startswith("/org/hypersdk/HyperSDK1/jobs/")
        assert "polkit check of org.hypersdk.HyperSDK1.export" in daemon.log()
    finally:
        daemon.stop()


def test_a_second_hypervisord_stops_before_touching_the_first_ones_jobs(
        system_bus, start_hypervisord, service_dir):
    first = start_hypervisord()
    address = system_bus.address
    path = json.loads(submit(address, {"steps": 600, "interval": 0.1}, kind="sleep")
                      .stdout.split()[1])
    second = Hypervisord(first.config_path, address)
    with pytest.raises(RuntimeError, match="is another hypervisord running"):
        second.start()
    assert second.process.returncode != 0
    assert job_property(address, path, "Status") in ("pending", "running")
    assert first.process.poll() is None


def test_a_refusal_polkit_would_lift_with_a_password_says_authentication_is_required(
        bus_with_challenging_polkitd, users, service_dir):
    address = bus_with_challenging_polkitd.address
    daemon = Hypervisord(write_config(service_dir), address)
    daemon.start()
    try:
        refused = gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.ListJobs", "{}", user=OUTSIDER)
        assert "AccessDenied: not authorized for org.hypersdk.HyperSDK1.view (authentication " \
               "is required)" in refused.stderr
        plain = gdbus_submit(address, {"steps": 1}, kind="sleep", user=OUTSIDER)
        assert "not authorized for org.hypersdk.HyperSDK1.export" in plain.stderr
        assert "authentication is required" not in plain.stderr  # polkit said no, not maybe
    finally:
        daemon.stop()


async def test_a_caller_whose_uid_the_bus_cannot_tell_is_nobody_and_refused(system_bus, polkitd):
    """A caller gone before its uid is asked for: never taken for root (uid 0)."""
    bus = await connect(system_bus.address)
    try:
        authority = Authority(bus)
        gone = ":1.4000000000"  # a unique name the bus never gave
        uid = await authority.caller_uid(gone)
        assert uid == UNKNOWN_UID
        with pytest.raises(AccessDenied, match="not authorized for org.hypersdk.HyperSDK1.export: "
                                               "the polkit check failed"):
            await authority.check(Caller(gone, uid), "org.hypersdk.HyperSDK1.export")
    finally:
        bus.disconnect()


def test_arguments_of_the_wrong_types_are_refused_naming_both(system_bus, hypervisord):
    refused = busctl(system_bus.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob",
                     "s", "{}", check=False)
    assert refused.returncode != 0
    assert "SubmitJob takes arguments of type 'sa{sv}', not 's'" in refused.stderr
