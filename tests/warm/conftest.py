"""Fixtures: a running simulator VM with one flat disk of real content, and the provider;
a proxy that holds the datastore reads of a round."""
from __future__ import annotations

import pytest

from tests.vcsim.harness import find_vm, give_disks, local_file, wait_task
from tests.vsphere.fault_proxy import GatedProxy
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


HOLD_AT = 100 << 10  # bytes into a round's datastore connection


class DatastoreGate(GatedProxy):
    """Holds datastore (/folder) connections at `hold_at` once `armed`; SOAP passes."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port, HOLD_AT)
        self.armed = False

    async def _pipe(self, reader, writer, limit, counted):
        held = limit if self.armed and counted == "folder" else None
        return await super()._pipe(reader, writer, held, counted)
