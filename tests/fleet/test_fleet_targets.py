"""A fleet sharing a target host: the instance that recovers a dead instance's job removes
what the job left on the target before running it again (service/fleet.py,
job_output.remove_from_shared_hosts). Two real hypervisords on one real PostgreSQL, the
target the real libvirtd reached through the real sshd (qemu+ssh://)."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from hypersdk.client.names import job_path
from tests.support.cli import wait_for_status
from tests.support.libvirtd import domain_defined, remove_domain
from tests.support.targets import dir_pool, volume_names
from tests.support.wait import wait_until

IMAGES_DIR = Path("/var/lib/libvirt/images")


@pytest.fixture
def data_disk():
    """512 MiB of random data, no holes (an upload over ssh takes a few seconds), in a
    directory every instance may read from."""
    directory = Path(tempfile.mkdtemp(prefix="hypersdk-fleet-", dir=IMAGES_DIR))
    disk = directory / "data.raw"
    with open(disk, "wb") as handle:
        for _ in range(512):
            handle.write(os.urandom(1 << 20))
    yield disk
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_the_recovering_instance_removes_the_dead_job_s_volume_on_the_shared_target(
        fleet, loopback_sshd, local_libvirt, data_disk):
    vm = "hsdk-fleet-" + uuid.uuid4().hex[:6]
    with dir_pool(local_libvirt) as pool:
        targets = {"targets": {"shared": {"uri": loopback_sshd.uri(), "pool": pool.name(),
                                          "format": "raw"}}}
        a, b = fleet.start("a", **targets), fleet.start("b", **targets)
        try:
            job_id = a.submit("import", {"vm_name": vm, "disk_path": str(data_disk),
                                         "disk_format": "raw", "memory_mb": 64, "network": "",
                                         "target": "shared"})
            wait_until(lambda: a.get_job(job_id)["Stage"] == "upload"
                       and a.get_job(job_id)["BytesDone"] > 0, 120, "the upload")
            # a submit starts at once on its instance, but the other may claim it first
            dead, survivor = (a, b) if a.get_job(job_id)["Instance"] == "a" else (b, a)
            dead.daemon.kill()  # kill -9 mid-upload: the half volume stays on the target
            volume = f"{vm}-disk0.raw"
            assert volume_names(pool) == [volume]

            wait_for_status(survivor.address, job_path(job_id), {"failed"}, timeout=60)
            retry = survivor.get_job(job_id)["Error"].rsplit(" as ", 1)[1]
            wait_until(lambda: job_path(retry) in survivor.list_jobs(), what="the retry")
            # the retry found the name free and landed the whole disk, on the survivor
            assert wait_for_status(survivor.address, job_path(retry), {"completed", "failed"},
                                   timeout=180) == "completed", survivor.get_job(retry)["Error"]
            assert survivor.get_job(retry)["Instance"] == survivor.name
            assert volume_names(pool) == [volume]
            path = pool.storageVolLookupByName(volume).path()
            assert os.path.getsize(path) == data_disk.stat().st_size
            assert _same_bytes(path, data_disk)
            logs = fleet.read(lambda store: store.logs(job_id))
            assert any(f"{survivor.name}: removed volume {volume!r} of pool {pool.name()!r}"
                       in line.message for line in logs), logs
            # and its records are gone: the dead instance's restart has nothing to remove
            assert fleet.read(lambda store: store.owned_volumes(job_id)) == []
        finally:
            remove_domain(local_libvirt, vm)
        assert not domain_defined(local_libvirt, vm)


def _same_bytes(one: str, other: Path) -> bool:
    with open(one, "rb") as left, open(other, "rb") as right:
        while True:
            chunk = left.read(1 << 20)
            if chunk != right.read(1 << 20):
                return False
            if not chunk:
                return True
