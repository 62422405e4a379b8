"""The govmomi vSphere simulator as fixtures, for every folder (registered by
tests/conftest.py): one per test (`sim`, with `si` connected to it), or one per module
(`module_sim`) where the tests only read or add VMs of their own."""
from __future__ import annotations

import pytest

from tests.vcsim.harness import Simulator, build_vcsim


@pytest.fixture(scope="session")
def vcsim_binary():
    """vcsim built once from Debian's govmomi sources (cached under /var/tmp)."""
    return build_vcsim()


@pytest.fixture
def sim(vcsim_binary):
    with Simulator() as simulator:
        yield simulator


@pytest.fixture(scope="module")
def module_sim(vcsim_binary):
    with Simulator() as simulator:
        yield simulator


@pytest.fixture
def si(sim):
    """A pyvmomi ServiceInstance connected to `sim`."""
    from pyVim.connect import Disconnect

    instance = sim.connect()
    yield instance
    Disconnect(instance)
