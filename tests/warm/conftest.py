"""Fixtures: a running simulator VM with one flat disk of real content, and the provider."""
from __future__ import annotations

import pytest

from tests.vcsim.harness import find_vm, give_disks, local_file, wait_task
from tests.vsphere.conftest import config, make_config, provider, registry  # noqa: F401

WARM_VM = "DC0_H0_VM0"
DISK_SIZE = 8 << 20


@pytest.fixture
def running_vm(sim, si, tmp_path):
    """WARM_VM powered on with one 8 MiB flat disk (descriptor + -flat.vmdk); the local
    path of its flat file, which a test may change between rounds."""
    work = tmp_path / "uploaded"
    work.mkdir()
    [disk] = give_disks(sim, si, WARM_VM, [DISK_SIZE], work, flat=True)
    wait_task(find_vm(si, WARM_VM).PowerOnVM_Task())
    return local_file(si, disk.datastore_path.replace(".vmdk", "-flat.vmdk"))
