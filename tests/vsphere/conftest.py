"""Fixtures: a config pointing at the simulator (tests/support/simulator.py), the provider."""
from __future__ import annotations

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.providers.registry import ProviderRegistry
from tests.vcsim.harness import Simulator, give_disks

DISK_SIZES = [16 << 20, 8 << 20]
EXPORT_VM = "DC0_H0_VM0"


def make_config(tmp_path, sim: Simulator, **provider_overrides):
    base = tmp_path / "exports"
    base.mkdir(exist_ok=True)
    document = {"export": {"base_path": str(base), "chunk_size": "256KiB", "max_retries": 2},
                "providers": {"vsphere": sim.provider_settings(**provider_overrides)}}
    return parse_config(document, "(test)", env={})


@pytest.fixture
def config(tmp_path, sim):
    return make_config(tmp_path, sim)


@pytest.fixture
async def registry(config):
    providers = ProviderRegistry(config)
    yield providers
    await providers.close()


@pytest.fixture
async def provider(registry):
    return await registry.get("vsphere")


@pytest.fixture
def uploaded(sim, si, tmp_path):
    """EXPORT_VM powered off with two disks of real content; the VMDKs that were uploaded."""
    work = tmp_path / "uploaded"
    work.mkdir()
    return give_disks(sim, si, EXPORT_VM, DISK_SIZES, work)
