"""The Azure provider through the real azure-mgmt-compute client against FakeArmServer,
downloading real SAS URLs from Azurite."""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotFound, Unavailable
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.base import require_extra

from ..support.wait import until
from ..vsphere.fault_proxy import FaultInjectingProxy
from .conftest import make_provider, make_vhd, upload_disk

MIB = 1024 * 1024


def _add_vm(arm_state, azurite, tmp_path, name: str, **kwargs) -> dict[str, bytes]:
    """A VM with an OS disk (8 MiB) and a data disk (1 MiB) whose VHDs are in Azurite."""
    from .fake_arm import add_vm
    disks = {f"{name}-os": make_vhd(tmp_path, f"{name}-os", 8 * MIB, b"OS-DISK" * 100),
             f"{name}-data": make_vhd(tmp_path, f"{name}-data", MIB, b"DATA" * 100)}
    for disk, data in disks.items():
        upload_disk(azurite, disk, data)
    add_vm(arm_state, kwargs.pop("group", "rg1"), name,
           disks=[(d, len(v) - 512) for d, v in disks.items()], **kwargs)
    return disks


def _revoked(arm_state) -> list[str]:
    return [c.path.split("/")[-2] for c in arm_state.calls_to("POST", "/endGetAccess")]


def _granted(arm_state) -> list[str]:
    return [c.path.split("/")[-2] for c in arm_state.calls_to("POST", "/beginGetAccess")]


async def test_list_vms_by_group_tags_name_and_state(provider, arm_state):
    from .fake_arm import add_vm
    add_vm(arm_state, "rg1", "web-1", tags={"env": "prod"}, disks=[("web-1-os", MIB)])
    add_vm(arm_state, "rg1", "web-2", tags={"env": "dev"}, power="deallocated",
           disks=[("web-2-os", MIB)], size="Standard_B1s", generation="V1")
    add_vm(arm_state, "rg2", "db-1", tags={"env": "prod"}, disks=[("db-1-os", MIB)])

    assert sorted(vm.name for vm in await provider.list_vms({})) == ["web-1", "web-2"]
    everywhere = await provider.list_vms({"resource_group": "rg2"})
    assert [vm.identifier for vm in everywhere] == ["rg2/db-1"]
    assert [vm.name for vm in await provider.list_vms({"tags": {"env": "prod"}})] == ["web-1"]
    off = await provider.list_vms({"power_state": "poweredOff"})
    assert [vm.name for vm in off] == ["web-2"]
    assert (off[0].cpus, off[0].memory_mb, off[0].firmware) == (1, 1024, "bios")
    for bad, field in (({"zone": "1"}, "filter.zone"), ({"power_state": "running"}, "filter.power_state"),
                       ({"tags": "env=prod"}, "filter.tags")):
        with pytest.raises(InvalidArgument) as caught:
            await provider.list_vms(bad)
        assert caught.value.field == field
    # every request carried an api-version and went through the real SDK
    assert all(c.path.startswith("/subscriptions/") for c in arm_state.calls)


async def test_vm_info_with_os_and_data_disks(provider, arm_state, azurite, tmp_path):
    _add_vm(arm_state, azurite, tmp_path, "app-1", tags={"role": "app"})
    vm = await provider.get_vm("app-1")
    assert (vm.identifier, vm.power_state, vm.cpus, vm.memory_mb) == ("rg1/app-1", "poweredOn", 2, 8192)
    assert (vm.firmware, vm.secure_boot, vm.guest_os) == ("uefi", True, "Linux")
    assert [(d.key, d.label, d.capacity_bytes, d.boot_order) for d in vm.disks] == [
        ("app-1-os", "os disk", 8 * MIB, 1), ("app-1-data", "data disk lun 0", MIB, None)]
    assert vm.tags == ["role=app"]
    [nic] = vm.nics
    assert (nic.key, nic.mac, nic.network) == ("app-1-nic", "00:0d:3a:00:00:01", "vnet1/default")
    del arm_state.nics["app-1-nic"]  # e.g. no read access to the network resources
    assert [(n.key, n.mac) for n in (await provider.get_vm("app-1")).nics] == [("app-1-nic", "")]
    with pytest.raises(NotFound, match="did you mean app-1"):
        await provider.get_vm("rg1/app-2")
    with pytest.raises(NotFound, match="no VM 'app-1' in resource group 'rg9'"):
        await provider.get_vm("rg9/app-1")


async def test_export_running_vm_through_snapshots(provider, arm_state, azurite, tmp_path, out, sink):
    disks = _add_vm(arm_state, azurite, tmp_path, "run-1")
    vm, exported = await provider.export_disks("rg1/run-1", out, ExportOptions(), sink)

    assert [d.key for d in exported] == ["run-1-os", "run-1-data"]
    for disk in exported:
        data = disk.path.read_bytes()
        assert data == disks[disk.key]
        assert disk.sha256 == hashlib.sha256(data).hexdigest()
        assert (disk.format, disk.file_bytes, disk.capacity_bytes) == ("vhd", len(data), len(data) - 512)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc",
                                          str(disk.path)], capture_output=True, check=True).stdout)
        assert info["virtual-size"] == disk.capacity_bytes
    snapshots = [c.path.rsplit("/", 1)[-1] for c in arm_state.calls_to("PUT", "")]
    assert len(snapshots) == 2 and all("-hypersdk-" in s for s in snapshots)
    assert _granted(arm_state) == snapshots and _revoked(arm_state) == snapshots
    assert arm_state.snapshots == {}  # deleted after the export
    # only the pages holding data were read (per disk: 3 written pieces of 64 KiB and the
    # 512-byte footer); everything else stays a hole
    assert sink.done == sink.total == 2 * (3 * 64 * 1024 + 512)
    assert exported[0].path.stat().st_blocks * 512 <= 1024 * 1024
    assert not any("sig=" in m for m in sink.lines)  # SAS URLs are secrets


async def test_shutdown_vm_deallocates_and_grants_the_disks(provider, arm_state, azurite,
                                                             tmp_path, out, sink):
    _add_vm(arm_state, azurite, tmp_path, "stop-1")
    options = ExportOptions(shutdown_vm=True, extra={"shutdown_timeout": 30.0})  # as the job passes it
    _, exported = await provider.export_disks("stop-1", out, options, sink)

    assert len(exported) == 2
    assert len(arm_state.calls_to("POST", "/stop-1/deallocate")) == 1
    assert _granted(arm_state) == ["stop-1-os", "stop-1-data"]  # the disks themselves
    assert _revoked(arm_state) == ["stop-1-os", "stop-1-data"]
    assert arm_state.calls_to("PUT", "") == [] and arm_state.calls_to("POST", "/start") == []
    assert arm_state.vms["stop-1"]["_power"] == "deallocated"


async def test_restore_power_state_restarts_before_the_download(provider, arm_state, azurite,
                                                                tmp_path, out, sink):
    _add_vm(arm_state, azurite, tmp_path, "back-1")
    options = ExportOptions(shutdown_vm=True, restore_power_state=True)
    _, exported = await provider.export_disks("back-1", out, options, sink)

    assert len(exported) == 2
    deallocate, = arm_state.calls_to("POST", "/back-1/deallocate")
    start, = arm_state.calls_to("POST", "/back-1/start")
    snapshots = arm_state.calls_to("PUT", "")
    grants = arm_state.calls_to("POST", "/beginGetAccess")
    # deallocated, snapshotted, running again, and only then read from the snapshots
    assert deallocate.time < min(c.time for c in snapshots)
    assert max(c.time for c in snapshots) < start.time < min(c.time for c in grants)
    assert all("-hypersdk-" in g.path for g in grants)
    assert arm_state.vms["back-1"]["_power"] == "running" and arm_state.snapshots == {}


async def test_failed_download_still_revokes_and_deletes(provider, arm_state, azurite, tmp_path,
                                                         out, sink):
    from .fake_arm import add_vm
    upload_disk(azurite, "bad-1-os", make_vhd(tmp_path, "bad-1-os", MIB, b"X"))
    # the data disk's blob was never uploaded: Azurite answers 404 to its SAS URL
    add_vm(arm_state, "rg1", "bad-1", disks=[("bad-1-os", MIB), ("bad-1-missing", MIB)])

    with pytest.raises(NotFound, match="downloading disk bad-1-missing: not found") as caught:
        await provider.export_disks("bad-1", out, ExportOptions(), sink)
    assert "sig=" not in str(caught.value) and not any("sig=" in m for m in sink.lines)

    assert len(_granted(arm_state)) == 2 and sorted(_revoked(arm_state)) == sorted(_granted(arm_state))
    assert arm_state.snapshots == {}
    assert list(out.iterdir()) == []  # the finished OS disk is removed too: nothing partial


async def _start_stalled_export(provider, arm, arm_state, out, sink) -> asyncio.Task:
    """An export of a deallocated VM whose download stalls (the blob URL never finishes)."""
    from .fake_arm import add_vm
    add_vm(arm_state, "rg1", "slow-1", power="deallocated", disks=[("slow-1-os", MIB)])
    arm_state.sas_for_disk = lambda disk: f"{arm.base_url}/stall/vhds/{disk}.vhd?sig=secret"
    task = asyncio.create_task(provider.export_disks("slow-1", out, ExportOptions(), sink))

    await until(lambda: arm_state.calls_to("GET", "/stall/vhds/slow-1-os.vhd") or task.done(),
                what="the download to start")
    assert not task.done()
    return task


async def test_cancel_during_download_revokes_access(provider, arm, arm_state, out, sink):
    task = await _start_stalled_export(provider, arm, arm_state, out, sink)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _revoked(arm_state) == ["slow-1-os"], sink.lines
    assert list(out.iterdir()) == []


async def test_cancel_again_during_cleanup_still_revokes(provider, arm, arm_state, out, sink):
    task = await _start_stalled_export(provider, arm, arm_state, out, sink)
    # the first revoke is throttled: the SDK waits out Retry-After (1 s) before trying again
    arm_state.throttle[("POST", "/endGetAccess")] = 1
    task.cancel()

    def revoke_calls(count: int) -> bool:
        return len(_revoked(arm_state)) >= count
    await until(lambda: revoke_calls(1), what="the first revoke")
    task.cancel()  # while the cleanup waits to retry the revoke
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: revoke_calls(2), what="the second revoke")  # the shielded cleanup went on


async def test_a_cancel_while_the_snapshot_is_being_made_still_deletes_it(provider, arm, arm_state,
                                                                           out, sink):
    """The fake ARM stores the snapshot of a running VM but holds its answer; the export is
    cancelled meanwhile."""
    from .fake_arm import add_vm
    add_vm(arm_state, "rg1", "busy-1", disks=[("busy-1-os", MIB)])
    arm_state.hold_snapshot_answer = asyncio.Event()
    task = asyncio.create_task(provider.export_disks("busy-1", out, ExportOptions(), sink))
    await until(lambda: arm_state.snapshots or task.done(), what="the snapshot being made")
    task.cancel()
    arm_state.hold_snapshot_answer.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert arm_state.snapshots == {}, sink.lines
    assert any(line.endswith("deleted") for line in sink.lines)


async def test_dropped_connection_mid_download_is_resumed(provider, arm_state, azurite, tmp_path,
                                                          out, sink):
    from .fake_arm import add_vm
    dense = make_vhd(tmp_path, "drop-1-os", MIB, b"")
    dense = bytes(range(256)) * (MIB // 256) + dense[MIB:]  # every page holds data
    upload_disk(azurite, "drop-1-os", dense)
    add_vm(arm_state, "rg1", "drop-1", power="deallocated", disks=[("drop-1-os", MIB)])
    proxy = await FaultInjectingProxy("127.0.0.1", urlsplit(azurite).port,
                                      cut_after=300 * 1024, cuts=1).start()
    real_sas = arm_state.sas_for_disk
    arm_state.sas_for_disk = lambda disk: real_sas(disk).replace(
        f":{urlsplit(azurite).port}/", f":{proxy.port}/")
    try:
        _, [disk] = await provider.export_disks("drop-1", out, ExportOptions(), sink)
    finally:
        await proxy.close()
    assert proxy.cuts_done == 1
    assert disk.path.read_bytes() == dense
    assert disk.sha256 == hashlib.sha256(dense).hexdigest()


async def test_not_a_vhd_is_refused_and_removed(provider, arm_state, azurite, out, sink):
    from .fake_arm import add_vm
    upload_disk(azurite, "raw-1-os", b"\x01" * MIB + b"\0" * 512)
    add_vm(arm_state, "rg1", "raw-1", power="deallocated", disks=[("raw-1-os", MIB)])
    with pytest.raises(Failed, match="raw-1-os.vhd: no VHD footer"):
        await provider.export_disks("raw-1", out, ExportOptions(), sink)
    assert list(out.iterdir()) == [] and _revoked(arm_state) == ["raw-1-os"]


async def test_unmanaged_disk_is_listed_but_not_exported(provider, arm_state, out, sink):
    from .fake_arm import add_vm
    add_vm(arm_state, "rg1", "old-1", disks=[("old-1-os", MIB)])
    os_disk = arm_state.vms["old-1"]["properties"]["storageProfile"]["osDisk"]
    del os_disk["managedDisk"]
    os_disk.update(diskSizeGB=30, vhd={"uri": "https://acct.blob.core.windows.net/vhds/old-1.vhd"})
    [vm] = await provider.list_vms({"name": "old-1"})
    assert vm.disks[0].capacity_bytes == 30 * 1024 ** 3
    with pytest.raises(InvalidArgument, match="unmanaged disks"):
        await provider.export_disks("old-1", out, ExportOptions(), sink)
    assert arm_state.calls_to("POST", "/beginGetAccess") == []


async def test_unknown_export_extra_is_refused(provider, out, sink):
    with pytest.raises(InvalidArgument) as caught:
        await provider.export_disks("rg1/any", out, ExportOptions(extra={"keep": True}), sink)
    assert caught.value.field == "options.provider_options.keep"


async def test_throttled_request_is_retried_after_retry_after(provider, arm_state):
    from .fake_arm import add_vm
    add_vm(arm_state, "rg1", "busy-1", disks=[("busy-1-os", MIB)])
    arm_state.throttle[("GET", "/virtualMachines/busy-1")] = 1
    vm = await provider.get_vm("busy-1")
    assert vm.name == "busy-1"
    first, second = arm_state.calls_to("GET", "/virtualMachines/busy-1")
    assert second.time - first.time >= 0.95  # Retry-After: 1 was honoured


async def test_wrong_token_is_a_clear_credentials_error(arm, tls):
    provider = make_provider(arm, tls[1], token="wrong-token")
    with pytest.raises(Unavailable, match="Azure refused the credentials"):
        await provider.list_vms({})
    await provider.close()


def test_client_secret_file_must_be_private(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("client-secret-value")
    secret.chmod(0o640)
    section = {"subscription_id": "s", "tenant_id": "t", "client_id": "c",
               "client_secret_file": str(secret)}
    with pytest.raises(ConfigError) as caught:
        parse_config({"providers": {"azure": section}}, "(test)", env={})
    assert "providers.azure.client_secret_file" in str(caught.value)
    assert "client-secret-value" not in str(caught.value)


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.mgmt.compute.aio", None)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[azure\]"):
        require_extra("azure.mgmt.compute.aio", "azure")
