"""The mirror is derived state: when hypervisord or the bus itself goes away and comes
back, the bridge says so (503) and then rebuilds it."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from ..support.hypervisord import Hypervisord, write_config
from ..support.system import PrivateSystemBus
from ..support.wait import wait_for_value
from .conftest import submit_sleep
from .stack import ANY_PORT, Bridge, curl, token_api, wait_status


def wait_health(bridge: Bridge, status: int, timeout: float = 15) -> dict:
    answer = wait_for_value(lambda: curl(bridge, "/health"),
                            lambda answer: answer.status == status, timeout,
                            f"/health to answer {status}")
    return answer.json()


@pytest.mark.slow
def test_the_bridge_survives_a_restart_of_the_bus(service_dir, users):
    """A bus of its own (root callers need no polkitd), stopped and started again."""
    bus_dir = Path(tempfile.mkdtemp(prefix="hypersdk-bridge-bus-"))
    bus = PrivateSystemBus.start(bus_dir)
    config = write_config(service_dir, daemon={"address": ANY_PORT},
                          api=token_api(service_dir))
    daemon = Hypervisord(config, bus.address)
    bridge = Bridge(config, bus.address)
    try:
        daemon.start()
        bridge.start()
        job_id = submit_sleep(bus.address, steps=1, interval=0.01)
        daemon.stop()
        bus.stop()
        assert "the connection to the bus was lost" in wait_health(bridge, 503)["reason"]
        bus = PrivateSystemBus.start(bus_dir)
        daemon = Hypervisord(config, bus.address)
        daemon.start()
        assert wait_health(bridge, 200)["status"] == "healthy"
        assert curl(bridge, f"/jobs/query?job_id={job_id}").json()["job_id"] == job_id
    finally:
        bridge.stop()
        daemon.stop()
        bus.stop()
        shutil.rmtree(bus_dir, ignore_errors=True)


def test_hypervisord_leaving_the_bus_makes_the_bridge_unhealthy(bridge, sleep_job, system_bus):
    job_id = sleep_job(steps=1, interval=0.01)
    wait_status(bridge, job_id, {"completed"})
    bridge.daemon.stop()
    health = wait_health(bridge, 503)
    assert health["status"] == "unhealthy" and "bus" in health["reason"]
    query = curl(bridge, f"/jobs/query?job_id={job_id}")
    assert query.status == 503 and query.json()["error"] == "ServiceUnavailable"
    assert "hypersdk_up 0" in curl(bridge, "/metrics").body
    again = Hypervisord(bridge.daemon.config_path, system_bus.address)
    again.start()
    try:
        wait_health(bridge, 200)
        assert curl(bridge, f"/jobs/query?job_id={job_id}").json()["status"] == "completed"
    finally:
        again.stop()
