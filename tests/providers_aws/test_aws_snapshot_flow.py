"""The whole AWS export flow with snapshots the provider makes itself, as a backup series
(moto in-process with the `SnapshotsOfVolumes` bridge of conftest.py)."""
from __future__ import annotations

import pytest

from hypersdk.service.errors import InvalidArgument
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.model import ExportOptions

from ..support.fake_sink import FakeExportSink
from ..vsphere.fake_context import run_job
from .conftest import REGION, client, make_provider, put_snapshot, run_instance
from .helpers import assert_image_holds, block_of

async def test_backup_series_full_then_incremental(inprocess_moto, volume_content, tmp_path):
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    provider = make_provider(tmp_path, inprocess_moto)
    instance = run_instance(ec2, "backup-1")
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    monday = {0: block_of("mbr"), 5: block_of("fs"), 9: block_of("data")}
    tuesday = {0: block_of("mbr"), 5: block_of("fs2"), 9: block_of("data")}
    volume_content[volume_id] = put_snapshot(ebs, monday)
    fetched = []
    provider.client("ebs").meta.events.register(
        "before-call.ebs.GetSnapshotBlock", lambda params, **_: fetched.append(params["url_path"]))
    full, inc = tmp_path / "monday", tmp_path / "tuesday"
    full.mkdir()
    inc.mkdir()

    vm, [disk] = await provider.export_disks(
        instance["InstanceId"], full, ExportOptions(extra={"keep_snapshots": True}), FakeExportSink())
    base_snapshot = vm.extra["snapshot_ids"][volume_id]
    assert_image_holds(disk.path, monday)
    assert len(fetched) == 3
    kept = ec2.describe_snapshots(SnapshotIds=[base_snapshot])["Snapshots"]
    assert kept[0]["VolumeId"] == volume_id  # made by the provider, kept as the next base

    fetched.clear()
    volume_content[volume_id] = put_snapshot(ebs, tuesday)  # the disk changed
    options = ExportOptions(extra={"base_snapshot_ids": {volume_id: base_snapshot},
                                   "base_images": {volume_id: str(disk.path)}})
    vm, [disk2] = await provider.export_disks(instance["InstanceId"], inc, options, FakeExportSink())

    assert_image_holds(disk2.path, tuesday)
    assert [p.rsplit("/", 1)[-1] for p in fetched] == ["5"]  # only the changed block
    new_snapshot = vm.extra["snapshot_ids"][volume_id]
    assert vm.extra["snapshots_deleted"] == [new_snapshot]  # not kept this time
    mine = ec2.describe_snapshots(Filters=[{"Name": "tag:hypersdk:instance",
                                            "Values": [instance["InstanceId"]]}])["Snapshots"]
    assert [s["SnapshotId"] for s in mine] == [base_snapshot]
    await provider.close()



async def test_export_job_kind_writes_the_raw_disk(inprocess_moto, volume_content, export_jobs):
    """jobs/export.py drives the provider the registry builds from the config."""
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    instance = run_instance(ec2, "job-1")
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    blocks = {0: block_of("boot"), 77: block_of("root")}
    volume_content[volume_id] = put_snapshot(ebs, blocks)
    exports = export_jobs.exports
    result = await run_job(ExportKind(), export_jobs.context({
        "vm_identifier": "job-1", "export_path": "job-1",
        "options": {"shutdown_vm": True, "restore_power_state": True}}))

    [disk] = result["disks"]
    path = exports / "job-1" / f"{volume_id}.raw"
    assert disk["path"] == str(path) and disk["format"] == "raw"
    assert_image_holds(path, blocks)
    assert disk["sha256"] in (exports / "job-1" / "job-1.mf").read_text()
    assert result["vm"]["extra"]["snapshots_deleted"] == [result["vm"]["extra"]["snapshot_ids"][volume_id]]
    state = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"


async def test_provider_options_of_an_export_job_reach_the_provider(inprocess_moto,
                                                                    volume_content, export_jobs):
    """options.provider_options → ExportOptions.extra: keep_snapshots keeps ours; a bad key
    is named with the job's field name."""
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    instance = run_instance(ec2, "job-2")
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    volume_content[volume_id] = put_snapshot(ebs, {0: block_of("boot")})
    kept = export_jobs.context({"vm_identifier": "job-2", "export_path": "kept",
                                "options": {"provider_options": {"keep_snapshots": True}}})
    result = await run_job(ExportKind(), kept)
    assert result["vm"]["extra"]["snapshots_deleted"] == []
    snapshot = result["vm"]["extra"]["snapshot_ids"][volume_id]
    assert ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    bad = export_jobs.context({"vm_identifier": "job-2", "export_path": "bad",
                               "options": {"provider_options": {"colour": "red"}}})
    with pytest.raises(InvalidArgument) as caught:
        await run_job(ExportKind(), bad)
    assert caught.value.field == "options.provider_options.colour"
