"""Fixtures: hypervisord plus a real hypersdk-bridge process on a free loopback port."""
from __future__ import annotations

import json

import pytest

from ..support.cli import submit
from ..support.hypervisord import Hypervisord, write_config
from ..support.system import existing_user, open_to_test_users
from .stack import ANY_PORT, Bridge, token_api


BRIDGE_USER = "hypersdk"  # api.bridge_user's default, as hypersdk-bridge.service runs


@pytest.fixture
def bridge_account(users) -> int:
    """The bridge's own system user (in group hypersdk), as sysusers.d creates it; its uid.
    Ask for it before hypervisord starts: that is when hypervisord looks the user up."""
    return existing_user(BRIDGE_USER, ["hypersdk"])


@pytest.fixture
def start_bridge(start_hypervisord, system_bus, service_dir):
    """start(**config overrides) -> Bridge, next to a hypervisord with the same config;
    token auth with the admin token in curl's config unless `api` says otherwise."""
    started: list[Bridge] = []

    def start(**overrides) -> Bridge:
        overrides = dict(overrides)
        daemon_section = {"address": ANY_PORT, **overrides.pop("daemon", {})}
        api = overrides.pop("api", {})
        if "auth" not in api:
            api = {**token_api(service_dir), **api}
        daemon = start_hypervisord(daemon=daemon_section, api=api, **overrides)
        tls = bool(api.get("tls_cert"))
        bridge = Bridge(daemon.config_path, system_bus.address, tls=tls)
        bridge.daemon = daemon
        started.append(bridge)
        return bridge.start()

    yield start
    for bridge in started:
        bridge.stop()


@pytest.fixture
def bridge(start_bridge) -> Bridge:
    return start_bridge()


@pytest.fixture(scope="module")
def shared_bridge(system_bus, polkitd, users, tmp_path_factory):
    """One hypervisord + bridge for a module's tests that only add jobs and read."""
    directory = tmp_path_factory.mktemp("bridge")
    open_to_test_users(directory)
    config = write_config(directory, daemon={"address": ANY_PORT},
                          api=token_api(directory))
    daemon = Hypervisord(config, system_bus.address)
    daemon.start()
    bridge = Bridge(config, system_bus.address)
    bridge.daemon = daemon
    try:
        yield bridge.start()
    finally:
        bridge.stop()
        daemon.stop()


def submit_sleep(address: str, **definition) -> str:
    """Submit a test "sleep" job over D-Bus (busctl); returns its job id."""
    reply = submit(address, {"steps": 5, "interval": 0.05, **definition}, kind="sleep")
    path = json.loads(reply.stdout.split()[1])
    return path.rsplit("/", 1)[-1].replace("_", "-")


@pytest.fixture
def sleep_job(system_bus):
    def make(**definition) -> str:
        return submit_sleep(system_bus.address, **definition)
    return make




@pytest.fixture
def vsphere_bridge(start_bridge, module_sim, service_dir):
    """A bridge whose hypervisord has the provider "vsphere" pointing at the simulator."""
    for root in ("exports", "kvm"):  # export.base_path, hyper2kvm.output_dir: confined
        (service_dir / root).mkdir()    # paths (issue 13) need their roots to exist
    return start_bridge(providers={"vsphere": module_sim.provider_settings()},
                        export={"base_path": str(service_dir / "exports"), "chunk_size": "256KiB"})
