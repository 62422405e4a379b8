"""End to end: a real hypervisord on the private bus, pointed at the vSphere simulator."""
from __future__ import annotations

import pytest

from tests.vsphere.conftest import EXPORT_VM, uploaded  # noqa: F401 - the `uploaded` fixture


@pytest.fixture
def vsphere_hypervisord(start_hypervisord, sim, service_dir):
    """hypervisord with the simulator as provider "vsphere" and libvirt's test driver."""
    return start_hypervisord(
        providers={"vsphere": sim.provider_settings()},
        export={"chunk_size": "256KiB"},
        libvirt={"uri": "test:///default"},
    )
