"""The paths that refuse: polkitd unreachable, a second hypervisord on the bus."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from ..support.cli import gdbus_submit, job_property, submit
from ..support.hypervisord import Hypervisord, write_config
from ..support.system import MEMBER, PrivateSystemBus


@pytest.fixture
def bus_without_polkitd():
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-bus-"))
    bus = PrivateSystemBus.start(directory)
    yield bus
    bus.stop()
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
