"""The AWS provider against a real moto_server: discovery, EBS direct export, incremental."""
from __future__ import annotations

import asyncio
import hashlib
import sys
import threading

import pytest

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotFound, Unavailable
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.base import require_extra

from ..support.wait import until
from .conftest import (SECRET, instance_on_snapshot_volume, make_provider, put_snapshot,
                       run_instance)
from .helpers import BLOCK, assert_image_holds, block_of

def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_list_filters_by_tags_state_and_name(provider, ec2):
    web = run_instance(ec2, "web-1", {"env": "prod", "team": "a"})
    run_instance(ec2, "web-2", {"env": "prod", "team": "b"})
    run_instance(ec2, "db-1", {"env": "dev"})
    ec2.stop_instances(InstanceIds=[web["InstanceId"]])

    prod = await provider.list_vms({"tags": {"env": "prod"}})
    assert sorted(vm.name for vm in prod) == ["web-1", "web-2"]
    stopped = await provider.list_vms({"state": "stopped"})
    assert [vm.name for vm in stopped] == ["web-1"]
    assert stopped[0].power_state == "poweredOff"
    both = await provider.list_vms({"tags": {"env": "prod", "team": "b"}, "state": ["running"]})
    assert [vm.name for vm in both] == ["web-2"]
    assert [vm.name for vm in await provider.list_vms({"name": "db-1"})] == ["db-1"]
    for bad, field in (({"colour": "red"}, "filter.colour"), ({"state": "asleep"}, "filter.state"),
                       ({"tags": ["env"]}, "filter.tags")):
        with pytest.raises(InvalidArgument) as caught:
            await provider.list_vms(bad)
        assert caught.value.field == field


async def test_vm_info_has_cpus_memory_disks_and_nics(provider, ec2):
    instance = run_instance(ec2, "app-1", {"env": "prod"}, instance_type="t3.medium")
    vm = await provider.get_vm("app-1")
    assert vm.identifier == instance["InstanceId"]
    assert (vm.cpus, vm.memory_mb) == (2, 4096)  # from DescribeInstanceTypes
    assert vm.power_state == "poweredOn"
    assert vm.firmware in ("bios", "uefi")
    assert "env=prod" in vm.tags
    [disk] = vm.disks
    assert disk.key == instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert (disk.capacity_bytes, disk.label, disk.boot_order) == (1024 ** 3, "/dev/sda1", 1)
    [nic] = vm.nics
    assert nic.mac == instance["NetworkInterfaces"][0]["MacAddress"]
    assert (await provider.get_vm(instance["InstanceId"])).name == "app-1"
    with pytest.raises(NotFound, match="did you mean app-1"):
        await provider.get_vm("app-2")


async def test_export_writes_snapshot_blocks_into_sparse_raw_image(provider, ec2, ebs, sink, out):
    blocks = {0: block_of("boot"), 1: block_of("one"), 9: block_of("nine"),
              100_000: block_of("far"), 2 * 1024 * 1024 - 1: block_of("last")}
    snapshot_id = put_snapshot(ebs, blocks)
    instance_id, volume_id = instance_on_snapshot_volume(ec2, "exp-1", snapshot_id)

    vm, [disk] = await provider.export_disks(
        instance_id, out, ExportOptions(extra={"snapshot_ids": {volume_id: snapshot_id}}), sink)

    assert disk.path == out / f"{volume_id}.raw" and disk.format == "raw"
    assert_image_holds(disk.path, blocks)
    assert disk.path.stat().st_blocks * 512 < 1024 * 1024  # sparse: holes stay holes
    assert disk.sha256 == _sha256(disk.path)
    assert (sink.total, sink.done) == (5 * BLOCK, 5 * BLOCK)
    assert vm.extra["snapshot_ids"] == {volume_id: snapshot_id}
    assert sorted(p.name for p in out.iterdir()) == [disk.path.name]  # no temp files left
    # a snapshot given by the user is never deleted
    assert ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]


async def test_incremental_export_reads_only_changed_blocks(provider, ec2, ebs, sink, tmp_path):
    first = {0: block_of("a"), 1: block_of("b"), 2: block_of("c"), 50: block_of("d"), 70: block_of("e")}
    second = {0: block_of("a"), 1: block_of("B"), 2: block_of("c"), 50: block_of("D")}  # 70 now zeros
    base_snapshot = put_snapshot(ebs, first)
    new_snapshot = put_snapshot(ebs, second)
    instance_id, volume_id = instance_on_snapshot_volume(ec2, "inc-1", base_snapshot)
    calls = []
    provider.client("ebs").meta.events.register(
        "before-call.ebs.GetSnapshotBlock", lambda params, **_: calls.append(params["url_path"]))
    full_dir, inc_dir = tmp_path / "full", tmp_path / "inc"
    full_dir.mkdir()
    inc_dir.mkdir()

    _, [base_disk] = await provider.export_disks(
        instance_id, full_dir, ExportOptions(extra={"snapshot_ids": {volume_id: base_snapshot}}), sink)
    assert len(calls) == 5
    calls.clear()
    options = ExportOptions(extra={"snapshot_ids": {volume_id: new_snapshot},
                                   "base_snapshot_ids": {volume_id: base_snapshot},
                                   "base_images": {volume_id: str(base_disk.path)}})
    vm, [disk] = await provider.export_disks(instance_id, inc_dir, options, sink)

    assert sorted(calls) == sorted(f"/snapshots/{new_snapshot}/blocks/{i}" for i in (1, 50))
    assert_image_holds(disk.path, second)
    assert vm.extra["snapshot_ids"] == {volume_id: new_snapshot}
    assert_image_holds(base_disk.path, first)  # the base image is untouched


async def test_export_snapshots_volumes_stops_and_restarts_and_cleans_up(provider, ec2, sink, out):
    """moto's EBS direct APIs cannot read a snapshot made by EC2 CreateSnapshot (moto
    keeps the two apart), so reading fails: the test checks everything around it."""
    instance = run_instance(ec2, "snap-1")
    instance_id = instance["InstanceId"]
    # extra as the export job kind passes it
    options = ExportOptions(shutdown_vm=True, restore_power_state=True, max_retries=0,
                            extra={"shutdown_timeout": 30.0})

    with pytest.raises(Failed, match="reading snapshot snap-"):
        await provider.export_disks(instance_id, out, options, sink)

    assert f"info: stop instance {instance_id}" in sink.lines
    # started again as soon as the snapshots completed, before their blocks were read
    start = sink.lines.index(f"info: start instance {instance_id}")
    assert any(m.startswith("info: snapshot snap-") and m.endswith("completed")
               for m in sink.lines[:start])
    assert any(m.startswith("info: reading snapshot") for m in sink.lines[start:])
    assert any(m.startswith("info: snapshot snap-") and m.endswith("completed") for m in sink.lines)
    assert any(m.startswith("info: snapshot snap-") and m.endswith("deleted") for m in sink.lines)
    mine = ec2.describe_snapshots(Filters=[{"Name": "tag:hypersdk:instance",
                                            "Values": [instance_id]}])["Snapshots"]
    assert mine == []  # the snapshot we made is gone
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"  # restored
    assert list(out.iterdir()) == []


async def test_keep_snapshots_keeps_the_snapshot_we_made(provider, ec2, sink, tmp_path):
    instance_id = run_instance(ec2, "keep-1")["InstanceId"]
    options = ExportOptions(max_retries=0, extra={"keep_snapshots": True})
    with pytest.raises(Failed):
        await provider.export_disks(instance_id, tmp_path, options, sink)
    mine = ec2.describe_snapshots(Filters=[{"Name": "tag:hypersdk:instance",
                                            "Values": [instance_id]}])["Snapshots"]
    assert len(mine) == 1


async def test_block_with_wrong_checksum_fails_and_leaves_nothing(provider, ec2, ebs, sink, out):
    snapshot_id = put_snapshot(ebs, {3: block_of("x"), 4: block_of("y")}, bad_checksum={4})
    instance_id, volume_id = instance_on_snapshot_volume(ec2, "bad-1", snapshot_id)
    with pytest.raises(Failed, match=f"snapshot {snapshot_id} block 4: .*SHA256"):
        await provider.export_disks(instance_id, out,
                                    ExportOptions(extra={"snapshot_ids": {volume_id: snapshot_id}}),
                                    sink)
    assert list(out.iterdir()) == []


async def test_cancel_while_reading_blocks_leaves_nothing(provider, ec2, ebs, sink, out):
    blocks = {i: block_of(str(i)) for i in range(40)}
    snapshot_id = put_snapshot(ebs, blocks)
    instance_id, volume_id = instance_on_snapshot_volume(ec2, "cancel-1", snapshot_id)
    started, cancelled = threading.Event(), threading.Event()

    def held_block(**_):  # every block read is held until the export is cancelled
        started.set()
        cancelled.wait(20)
    provider.client("ebs").meta.events.register("before-call.ebs.GetSnapshotBlock", held_block)
    task = asyncio.create_task(provider.export_disks(
        instance_id, out, ExportOptions(extra={"snapshot_ids": {volume_id: snapshot_id}}), sink))
    await until(started.is_set, what="the first block read")
    task.cancel()
    cancelled.set()  # the reads in flight now answer: nothing of theirs may land
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.done < sink.total
    assert list(out.iterdir()) == []  # the temporary image is gone, no block wrote after


async def test_a_cancel_while_the_snapshot_is_being_created_still_deletes_it(provider, ec2, sink,
                                                                               out):
    """moto creates the snapshot; its answer is held until the export was cancelled."""
    instance_id = run_instance(ec2, "cancel-snap-1")["InstanceId"]
    answered, cancelled = threading.Event(), threading.Event()

    def held_answer(**_):
        answered.set()
        cancelled.wait(20)
    provider.client("ec2").meta.events.register("after-call.ec2.CreateSnapshot", held_answer)
    task = asyncio.create_task(provider.export_disks(instance_id, out, ExportOptions(), sink))
    await until(answered.is_set, what="moto creating the snapshot")
    mine = ec2.describe_snapshots(Filters=[{"Name": "tag:hypersdk:instance",
                                            "Values": [instance_id]}])["Snapshots"]
    assert len(mine) == 1  # made, and the export does not know its id yet
    task.cancel()
    cancelled.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    mine = ec2.describe_snapshots(Filters=[{"Name": "tag:hypersdk:instance",
                                            "Values": [instance_id]}])["Snapshots"]
    assert mine == []
    assert any(line.endswith("deleted") for line in sink.lines)


async def test_bad_export_extras_name_the_field(provider, ec2, tmp_path, sink):
    instance = run_instance(ec2, "opt-1")
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    cases = [({"colour": 1}, "options.provider_options.colour"),
             ({"snapshot_ids": {"vol-nope": "snap-1"}}, "options.provider_options.snapshot_ids.vol-nope"),
             ({"base_snapshot_ids": {volume_id: "snap-1"}}, f"options.provider_options.base_images.{volume_id}"),
             ({"shutdown_timeout": 0}, "options.shutdown_timeout"),
             ({"base_snapshot_ids": {volume_id: "snap-1"}, "base_images": {volume_id: "/etc/passwd"}},
              f"options.provider_options.base_images.{volume_id}")]
    for extra, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await provider.export_disks(instance["InstanceId"], tmp_path, ExportOptions(extra=extra), sink)
        assert caught.value.field == field


async def test_wrong_credentials_give_a_clear_error_without_the_secret(tmp_path, moto_auth_url):
    provider = make_provider(tmp_path, moto_auth_url, max_retries=0)
    with pytest.raises(Unavailable, match="AWS refused the credentials .*AuthFailure") as caught:
        await provider.list_vms({})
    assert SECRET not in str(caught.value)
    await provider.close()


async def test_credentials_from_the_environment_or_a_clear_error(tmp_path, moto, ec2, monkeypatch):
    run_instance(ec2, "env-1")
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    provider = make_provider(tmp_path, moto, access_key_id="", secret_access_key_file="")
    assert [vm.name for vm in await provider.list_vms({})] == ["env-1"]
    await provider.close()

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    provider = make_provider(tmp_path, moto, access_key_id="", secret_access_key_file="")
    with pytest.raises(Unavailable, match="no AWS credentials found"):
        await provider.list_vms({})
    await provider.close()


def test_secret_file_must_be_private(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    section = {"access_key_id": "AKID", "secret_access_key_file": str(secret_file)}
    with pytest.raises(ConfigError) as caught:
        parse_config({"providers": {"aws": section}}, "(test)", env={})
    text = str(caught.value)
    assert "providers.aws.secret_access_key_file" in text and "0644" in text
    assert SECRET not in text


def test_missing_boto3_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[aws\]"):
        require_extra("boto3", "aws")
