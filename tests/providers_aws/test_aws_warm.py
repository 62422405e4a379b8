"""Warm migration from AWS: pre-copy rounds of EBS snapshots read with the EBS direct APIs
(jobs/warm.py drives providers/aws_warm.py), against moto in-process with the
`SnapshotsOfVolumes` bridge of conftest.py: each snapshot the provider makes holds what
the test declared as its volume's content at that moment.

moto's ListChangedBlocks reports the blocks of the first snapshot that differ or are
gone in the second, not blocks that exist only in the second (AWS reports those too), so
the deltas here change and remove blocks; the code reads a new block exactly as a changed
one (its SecondBlockToken).
"""
from __future__ import annotations

import asyncio

import pytest

from hypersdk.service.job_output import StoreCheckpoints
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.jobs.warm import DiskState, WarmSettings, run_warm
from hypersdk.service.model import ExportOptions
from hypersdk.service.store import JobRecord, Store

from ..support.fake_sink import FakeExportSink
from ..vsphere.fake_context import run_job
from .conftest import client, make_provider, put_snapshot, run_instance
from .helpers import assert_image_holds, block_of


def _our_snapshots(ec2, instance_id: str) -> list[str]:
    found = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:hypersdk:instance", "Values": [instance_id]}])["Snapshots"]
    return sorted(snap["SnapshotId"] for snap in found)


def _state(ec2, instance_id: str) -> str:
    found = ec2.describe_instances(InstanceIds=[instance_id])
    return found["Reservations"][0]["Instances"][0]["State"]["Name"]


async def test_precopy_rounds_read_only_changed_blocks_then_cutover(inprocess_moto,
                                                                    volume_content, tmp_path):
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    provider = make_provider(tmp_path, inprocess_moto)
    instance = run_instance(ec2, "warm-1")
    instance_id = instance["InstanceId"]
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    contents = [
        {0: block_of("mbr"), 1: block_of("boot"), 5: block_of("fs"), 9: block_of("data")},
        {0: block_of("mbr"), 1: block_of("boot"), 5: block_of("fs2"), 9: block_of("data")},
        {0: block_of("mbr"), 1: block_of("boot2"), 5: block_of("fs2")},  # 9 now zeros
    ]
    volume_content[volume_id] = put_snapshot(ebs, contents[0])
    fetched: list[str] = []
    provider.client("ebs").meta.events.register(
        "before-call.ebs.GetSnapshotBlock",
        lambda params, **_: fetched.append(params["url_path"].rsplit("/", 1)[-1]))
    per_round: list[list[str]] = []
    seen_snapshots: list[list[str]] = []
    cutover = asyncio.Event()

    def on_round(entry: dict) -> None:
        per_round.append(sorted(fetched))
        fetched.clear()
        seen_snapshots.append(_our_snapshots(ec2, instance_id))
        if entry["round"] < len(contents):  # the volume changes while the VM runs
            volume_content[volume_id] = put_snapshot(ebs, contents[entry["round"]])
        if entry["round"] == 2:
            cutover.set()

    sink = FakeExportSink()
    source = await provider.warm_source(instance_id, ExportOptions(), sink)
    images = tmp_path / "images"
    images.mkdir()
    try:
        result = await run_warm(source, images, [f"{volume_id}.raw"], None,
                                WarmSettings(precopy_interval=0), cutover, sink, "a",
                                on_round=on_round)
    finally:
        await source.close()
        await provider.close()

    # round 1 all four blocks; round 2 only block 5; the final round block 1, and block 9
    # written as zeros without a fetch
    assert per_round == [["0", "1", "5", "9"], ["5"], ["1"]]
    assert [(r["round"], r["bytes"], r["final"]) for r in result.rounds] == [
        (1, 4 * 512, False), (2, 512, False), (3, 2 * 512, True)]
    assert_image_holds(result.disks[0].path, contents[2])
    assert _state(ec2, instance_id) == "stopped"  # shut down at cutover
    # after each round only its snapshot is left, the next round's base; none at the end
    assert [len(names) for names in seen_snapshots] == [1, 1, 1]
    assert len({names[0] for names in seen_snapshots}) == 3
    assert _our_snapshots(ec2, instance_id) == []


class _Killed(BaseException):
    """The daemon's kill -9: nothing after it runs (no cleanup, no close)."""


async def test_a_resumed_run_reads_the_delta_from_its_predecessors_base_and_removes_its_round(
        inprocess_moto, volume_content, tmp_path):
    """A run that died (kill -9) after round 1, with round 2's snapshot made: the next run,
    with the job's checkpoints in the real store, deletes round 2's snapshot, reads only
    what changed since round 1's snapshot, and deletes that base too."""
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    provider = make_provider(tmp_path, inprocess_moto)
    instance = run_instance(ec2, "warm-2")
    instance_id = instance["InstanceId"]
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    first = {0: block_of("a"), 3: block_of("b")}
    second = {0: block_of("a"), 3: block_of("c")}
    volume_content[volume_id] = put_snapshot(ebs, first)
    store = Store(tmp_path / "jobs.db")
    await store.insert_job(JobRecord(id="job-1", kind="export", status="running",
                                     definition={}))
    checkpoints = StoreCheckpoints(store, "job-1", 1, store.soon)
    sink = FakeExportSink()
    images = tmp_path / "images"
    images.mkdir()
    name = f"{volume_id}.raw"

    dead = await provider.warm_source(instance_id, ExportOptions(), sink)
    create = dead.create_snapshot

    async def nothing(*_args) -> None:
        """What the source does once the process is dead."""

    async def create_then_die(round_name: str) -> None:
        await create(round_name)
        if round_name.endswith("-2"):
            dead.remove_snapshots = dead.close = nothing
            raise _Killed()

    dead.create_snapshot = create_then_die
    changed = lambda entry: volume_content.update({volume_id: put_snapshot(ebs, second)})
    with pytest.raises(_Killed):
        await run_warm(dead, images, [name], checkpoints, WarmSettings(precopy_interval=0),
                       asyncio.Event(), sink, "r", on_round=changed)
    left = _our_snapshots(ec2, instance_id)
    assert len(left) == 2  # round 1's, the base, and round 2's
    base = DiskState.saved(checkpoints, name).change_id

    fetched: list[str] = []
    provider.client("ebs").meta.events.register(
        "before-call.ebs.GetSnapshotBlock",
        lambda params, **_: fetched.append(params["url_path"].rsplit("/", 1)[-1]))
    again = await provider.warm_source(instance_id, ExportOptions(), sink)
    checkpoints = StoreCheckpoints(store, "job-1", 1, store.soon)  # as the restart reads them
    await checkpoints.load()
    cutover = asyncio.Event()
    cutover.set()
    try:
        result = await run_warm(again, images, [name], checkpoints,
                                WarmSettings(precopy_interval=3600), cutover, sink, "r")
    finally:
        await again.close()
        await provider.close()
        await store.close()
    assert fetched == ["3"]  # the delta since round 1's snapshot only
    assert [(r["round"], r["bytes"], r["final"]) for r in result.rounds] == [(2, 512, True)]
    assert_image_holds(result.disks[0].path, second)
    assert _our_snapshots(ec2, instance_id) == []
    [begun] = [snapshot for snapshot in left if snapshot != base]
    assert base in left  # round 1's snapshot was the resume's base
    deleted = [line for line in sink.lines if line.endswith(" deleted")]
    assert deleted[:2] == [f"info: snapshot {begun} deleted", f"info: snapshot {base} deleted"]


async def test_a_warm_export_job_on_aws_reports_rounds_and_downtime(inprocess_moto,
                                                                    volume_content, export_jobs):
    """jobs/export.py with `warm`: a cutover_at already past gives one final round; the
    result has the round and the downtime, the instance is stopped, no snapshot is left."""
    ec2, ebs = client(inprocess_moto, "ec2"), client(inprocess_moto, "ebs")
    instance = run_instance(ec2, "warm-job")
    volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    blocks = {0: block_of("boot"), 77: block_of("root")}
    volume_content[volume_id] = put_snapshot(ebs, blocks)
    result = await run_job(ExportKind(), export_jobs.context({
        "vm_identifier": "warm-job", "export_path": "warm-job", "warm": True,
        "cutover_at": "2026-01-01T00:00:00Z"}))
    assert result["warm"] is True and result["downtime_seconds"] >= 0
    assert [(r["round"], r["bytes"], r["final"]) for r in result["rounds"]] == [
        (1, 2 * 512, True)]
    [disk] = result["disks"]
    assert_image_holds(export_jobs.exports / "warm-job" / "warm-job-disk1.raw", blocks)
    assert disk["format"] == "raw"
    assert _state(ec2, instance["InstanceId"]) == "stopped"
    assert _our_snapshots(ec2, instance["InstanceId"]) == []
