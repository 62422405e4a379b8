"""The export job kind (jobs/export.py) driving the Azure provider from the registry:
disks land in the export directory as fixed VHDs, named in the manifest, readable by qemu-img."""
from __future__ import annotations

import hashlib
import json
import subprocess

from hypersdk.service.config import parse_config
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.providers.azure import AzureProvider
from hypersdk.service.providers.registry import ProviderRegistry

from ..vsphere.fake_context import job_context, run_job
from .conftest import StaticTokenCredential, make_vhd, upload_disk
from .fake_arm import SUB, add_vm

MIB = 1024 * 1024


async def test_export_job_writes_the_vm_disks_as_vhd(arm, arm_state, azurite, tls, tmp_path,
                                                     monkeypatch):
    # the registry builds the provider itself; its credential chain becomes a static token
    monkeypatch.setattr(AzureProvider, "_make_credential", lambda self: StaticTokenCredential())
    vhd = make_vhd(tmp_path, "job-1-os", 2 * MIB, b"JOB" * 200)
    upload_disk(azurite, "job-1-os", vhd)
    add_vm(arm_state, "rg1", "job-1", disks=[("job-1-os", 2 * MIB)])
    exports = tmp_path / "exports"
    exports.mkdir()
    config = parse_config({
        "export": {"base_path": str(exports)},
        "providers": {"azure": {"subscription_id": SUB, "resource_group": "rg1",
                                "arm_endpoint": arm.base_url, "ca_file": tls[1],
                                "poll_interval": "10ms"}}}, "(test)", env={})
    registry = ProviderRegistry(config)
    kind = ExportKind()
    ctx = job_context(kind, {"vm_identifier": "rg1/job-1", "provider": "azure",
                             "export_method": "disk", "export_path": "job-1",
                             "options": {"shutdown_vm": True, "restore_power_state": True}},
                      config, registry)
    try:
        result = await run_job(kind, ctx)
    finally:
        await registry.close()

    [disk] = result["disks"]
    path = exports / "job-1" / "job-1-os.vhd"
    assert disk["path"] == str(path) and disk["format"] == "vhd"
    assert path.read_bytes() == vhd
    assert disk["sha256"] == hashlib.sha256(vhd).hexdigest()
    manifest = (exports / "job-1" / "job-1.mf").read_text()
    assert disk["sha256"] in manifest
    # qemu-img reads it as a VHD; note its probe alone calls a fixed VHD "raw" (the cookie is
    # only in the footer), so the format must come from the disk entry's "vhd"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", str(path)],
                                     capture_output=True, check=True).stdout)
    assert info["virtual-size"] == 2 * MIB
    assert len(arm_state.calls_to("POST", "/job-1/deallocate")) == 1
    assert len(arm_state.calls_to("POST", "/job-1/start")) == 1
    assert len(arm_state.calls_to("POST", "/endGetAccess")) == 1  # access revoked
    assert arm_state.snapshots == {}  # the snapshot made to restart the VM early is gone
    assert ctx.done == ctx.total > 0
