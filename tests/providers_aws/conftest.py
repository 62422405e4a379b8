"""A real moto_server (EC2 + EBS direct APIs) on loopback, and an AWS provider pointed at it.

moto keeps EC2 snapshots (CreateSnapshot) and EBS direct API data (StartSnapshot/
PutSnapshotBlock) apart, so a snapshot made by CreateSnapshot has no blocks to read. For
the tests of snapshots the provider makes itself, moto runs in-process
(`inprocess_moto`: ThreadedMotoServer, still spoken to over HTTP by boto3) and a small
bridge, `SnapshotsOfVolumes`, gives each EC2 snapshot the block data of the EBS snapshot
the test declared as its volume's current content when the snapshot is first read.
Everything else is moto's.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.ebs.models import ebs_backends
from moto.ec2.models import ec2_backends
from moto.server import ThreadedMotoServer

from hypersdk.service.config import parse_config
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.providers.aws import AwsProvider
from hypersdk.service.providers.registry import ProviderRegistry

from ..support.fake_sink import FakeExportSink
from ..vsphere.fake_context import job_context
from ..support.servers import start_on_any_port

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
REGION = "us-east-1"
KEY_ID = "AKIDTESTEXAMPLE0001"
SECRET = "s3cr3t-key-never-logged-0001"


def _start_moto(env_extra: dict | None = None):
    env = dict(os.environ, **(env_extra or {}))
    proc, port = start_on_any_port([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", "0"],
                                   "moto_server", env=env)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def moto_url():
    proc, url = _start_moto()
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def moto_auth_url():
    """A moto_server that checks credentials (none are known, so every key is refused)."""
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    _stop(proc)


@pytest.fixture
def moto(moto_url):
    """The moto server, emptied before each test."""
    request = urllib.request.Request(moto_url + "/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return moto_url


def client(url: str, service: str):
    return boto3.client(service, endpoint_url=url, region_name=REGION,
                        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)


@pytest.fixture
def ec2(moto):
    return client(moto, "ec2")


@pytest.fixture
def ebs(moto):
    return client(moto, "ebs")


def make_provider(tmp_path: Path, url: str, max_retries: int = 1, **settings) -> AwsProvider:
    secret_file = tmp_path / "aws-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    section = {"type": "aws", "region": REGION, "endpoint_url": url, "access_key_id": KEY_ID,
               "secret_access_key_file": str(secret_file), "poll_interval": "10ms",
               "parallel_blocks": 4, **settings}
    config = parse_config({"providers": {"aws": section},
                           "export": {"max_retries": max_retries, "base_path": str(tmp_path)}},
                          "(test)", env={})
    return AwsProvider("aws", config.providers["aws"], config)


@pytest.fixture
async def provider(tmp_path, moto):
    made = make_provider(tmp_path, moto)
    yield made
    await made.close()


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty export directory."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def sink() -> FakeExportSink:
    return FakeExportSink()


def put_snapshot(ebs, blocks: dict[int, bytes], size_gib: int = 1,
                 bad_checksum: set[int] = frozenset()) -> str:
    """A completed snapshot made with StartSnapshot/PutSnapshotBlock/CompleteSnapshot."""
    snapshot_id = ebs.start_snapshot(VolumeSize=size_gib, Description="test data")["SnapshotId"]
    for index, data in blocks.items():
        digest = hashlib.sha256(b"tampered" if index in bad_checksum else data).digest()
        ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data,
                               DataLength=len(data), ChecksumAlgorithm="SHA256",
                               Checksum=base64.b64encode(digest).decode())
    ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=len(blocks))
    return snapshot_id


@functools.cache
def _image_id(ec2_url: str) -> str:
    """One of moto's built-in AMIs (the same after every reset); the listing is large, so once."""
    return client(ec2_url, "ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def run_instance(ec2, name: str, tags: dict | None = None, instance_type: str = "t3.medium") -> dict:
    image_id = _image_id(ec2.meta.endpoint_url)
    all_tags = [{"Key": "Name", "Value": name}] + [{"Key": k, "Value": v} for k, v in (tags or {}).items()]
    made = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType=instance_type,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": all_tags}],
                             BlockDeviceMappings=[{"DeviceName": "/dev/sda1",
                                                   "Ebs": {"VolumeSize": 1}}])
    return made["Instances"][0]


def instance_on_snapshot_volume(ec2, name: str, snapshot_id: str) -> tuple[str, str]:
    """An instance whose only volume is the one moto made for `snapshot_id` (its root swapped).

    moto's EBS direct APIs only know snapshots made with StartSnapshot, so the test
    puts such a snapshot's volume under an instance to export it.
    """
    instance = run_instance(ec2, name)
    instance_id = instance["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    root = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    ec2.detach_volume(VolumeId=root, InstanceId=instance_id)
    volume_id = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["VolumeId"]
    ec2.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device="/dev/sda1")
    return instance_id, volume_id


ACCOUNT = "123456789012"  # moto's default account


class SnapshotsOfVolumes(dict):
    """moto's EBS snapshot table; an EC2 snapshot it does not know reads as the EBS snapshot
    holding its volume's content (`content[volume_id]`) when it was first read."""

    def __init__(self, existing: dict, content: dict[str, str]) -> None:
        super().__init__(existing)
        self.content = content

    def __missing__(self, snapshot_id: str):
        ec2_snapshot = ec2_backends[ACCOUNT][REGION].snapshots.get(snapshot_id)
        if ec2_snapshot is None or ec2_snapshot.volume.id not in self.content:
            raise KeyError(snapshot_id)
        self[snapshot_id] = self[self.content[ec2_snapshot.volume.id]]
        return self[snapshot_id]


@pytest.fixture(scope="module")
def inprocess_moto():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def volume_content(inprocess_moto) -> dict[str, str]:
    """volume id -> id of the EBS snapshot whose blocks are that volume's data."""
    backend = ebs_backends[ACCOUNT][REGION]
    backend.snapshots = SnapshotsOfVolumes(backend.snapshots, {})
    return backend.snapshots.content


@dataclass
class ExportJobs:
    """Export jobs (jobs/export.py) on the AWS provider the registry builds from the
    config, landing under `exports` (export.base_path)."""

    exports: Path
    config: Any
    registry: ProviderRegistry

    def context(self, definition: dict):
        return job_context(ExportKind(), {"provider": "aws", "export_method": "disk",
                                          **definition}, self.config, self.registry)


@pytest.fixture
async def export_jobs(inprocess_moto, tmp_path) -> ExportJobs:
    exports = tmp_path / "exports"
    exports.mkdir()
    config = parse_config({"export": {"base_path": str(exports)},
                           "providers": {"aws": make_provider(tmp_path, inprocess_moto).settings}},
                          "(test)", env={})
    jobs = ExportJobs(exports, config, ProviderRegistry(config))
    yield jobs
    await jobs.registry.close()
