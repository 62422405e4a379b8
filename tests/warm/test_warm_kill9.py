"""`kill -9` of hypervisord in the middle of a warm export's pre-copy round (simulator
extension: tests/vcsim/cbt.go): the restart removes the round's snapshot, the retry
resumes after the last completed round — reading only what changed since, not the whole
disk — and after cutover the image equals the disk."""
from __future__ import annotations

import asyncio
import json

from tests.support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, BusMonitor, busctl,
                               busctl_json, job_property, submit, wait_for_status)
from tests.support.hypervisord import Hypervisord
from tests.support.wait import until
from tests.vcsim.harness import folder_bytes

from .conftest import WARM_VM, DatastoreGate
from .test_warm_job import BLOCK, _same, _snapshot_names, _write

def _messages(address: str, job_id: str) -> list[str]:
    log = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetJobLog",
                      "sta{sv}", job_id, "0", "0")["data"][0]
    return [line[3] for line in log]


async def test_kill9_mid_round_then_retry_resumes_after_the_last_completed_round(
        start_hypervisord, system_bus, sim, si, running_vm):
    address = system_bus.address
    proxy = await DatastoreGate(sim.host, sim.port).start()
    daemon = await asyncio.to_thread(
        start_hypervisord, providers={"vsphere": sim.provider_settings(port=proxy.port)})
    restarted = Hypervisord(daemon.config_path, address)
    try:
        with BusMonitor(address) as monitor:
            definition = {"vm_identifier": WARM_VM, "provider": "vsphere",
                          "export_method": "disk", "export_path": "warm-kill", "warm": True,
                          "precopy_interval": 1}
            path = json.loads(submit(address, definition).stdout.split()[1])
            job_id = job_property(address, path, "Id")
            await asyncio.to_thread(monitor.wait_for, "pre-copy round 1", 60)
            proxy.armed = True  # round 2 reads the first extent, then is held in the second
            _write(running_vm, 1 << 20, b"a" * BLOCK)
            _write(running_vm, 5 << 20, b"b" * (3 * BLOCK))
            await asyncio.wait_for(proxy.holding.wait(), 30)
        assert _snapshot_names(si) == [f"hypersdk-warm-{job_id}-2"]
        await asyncio.to_thread(daemon.kill)
        proxy.armed = False
        proxy.release.set()
        await asyncio.to_thread(restarted.start)
        assert job_property(address, path, "Status") == "failed"
        assert job_property(address, path, "Error").startswith("interrupted:")
        removed = f"removed snapshot hypersdk-warm-{job_id}-2"
        await until(lambda: removed in _messages(address, job_id), 30,
                    "the restart removing the snapshot")
        assert _snapshot_names(si) == []

        served = folder_bytes(sim)
        with BusMonitor(address) as monitor:
            retried = busctl_json(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                                  "RetryJob", "sa{sv}", job_id, "0")["data"][0]
            await asyncio.to_thread(monitor.wait_for, "resuming warm migration after round 1",
                                    60)
            await asyncio.to_thread(monitor.wait_for, "pre-copy round 2", 60)
            busctl(address, "call", BUS_NAME, retried, JOB_IFACE, "Cutover", "a{sv}", "0")
            status = await asyncio.to_thread(wait_for_status, address, retried,
                                             {"completed", "failed"}, 60)
        assert status == "completed", job_property(address, retried, "Error")
        result = json.loads(job_property(address, retried, "Result"))
        assert result["rounds"][0]["round"] == 2 and result["rounds"][0]["bytes"] == 4 * BLOCK
        assert all(r["bytes"] == 0 for r in result["rounds"][1:])
        assert folder_bytes(sim) - served < 8 * BLOCK  # the delta and a descriptor, not 4 MiB
        assert _same(result["disks"][0]["path"], running_vm)
        assert _snapshot_names(si) == []
    finally:
        await asyncio.to_thread(restarted.stop)
        await proxy.close()
