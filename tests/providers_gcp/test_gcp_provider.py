"""The GCP provider through the real google-cloud-compute and google-cloud-storage clients:
compute calls against FakeComputeServer, the download against gcp-storage-emulator."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotAuthorized, NotFound
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.gcp import GcpProvider

from ..support.wait import until
from ..support.fake_sink import FakeExportSink
from .fake_compute import BUCKET, PROJECT, storage_client


def make_provider(fake, gcs_endpoint: str, **overrides) -> GcpProvider:
    section = {"type": "gcp", "project": PROJECT, "anonymous": True,
               "export_bucket": BUCKET, "compute_endpoint": fake.url,
               "storage_endpoint": gcs_endpoint, "cloudbuild_endpoint": fake.url,
               "poll_interval": "10ms", **overrides}
    config = parse_config({"providers": {"gcp": section}}, "test")
    return GcpProvider("gcp", config.providers["gcp"], config)


def qcow2_bytes(tmp_path: Path, name: str, size: int) -> bytes:
    """A real qcow2 image holding random data, as the exporter would write it."""
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(os.urandom(size))
    out = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True)
    return out.read_bytes()


@pytest.fixture
def populated(fake_compute, tmp_path):
    fake_compute.add_instance("us-central1-a", "web-1", labels={"env": "prod"}, uefi=True,
                              disks={"web-1-boot": qcow2_bytes(tmp_path, "a", 3 << 20),
                                     "web-1-data": qcow2_bytes(tmp_path, "b", 1 << 20)})
    fake_compute.add_instance("us-central1-a", "db-1", status="TERMINATED",
                              labels={"env": "dev"}, disks={"db-1-boot": b"x" * 4096})
    fake_compute.add_instance("europe-west1-b", "web-2", labels={"env": "prod"},
                              machine_type="n2-standard-4", disks={"web-2-boot": b"y" * 4096})
    return fake_compute


async def test_list_instances_with_filters(populated, gcs_emulator):
    provider = make_provider(populated, gcs_emulator)
    names = lambda vms: sorted(vm.name for vm in vms)  # noqa: E731
    assert names(await provider.list_vms({})) == ["db-1", "web-1", "web-2"]
    assert names(await provider.list_vms({"zone": "europe-west1-b"})) == ["web-2"]
    assert names(await provider.list_vms({"labels": {"env": "prod"}})) == ["web-1", "web-2"]
    assert names(await provider.list_vms({"name": "web-*"})) == ["web-1", "web-2"]
    assert names(await provider.list_vms({"power_state": "poweredOff"})) == ["db-1"]
    populated.paged = True
    listing = f"GET /compute/v1/projects/{PROJECT}/aggregated/instances"
    before = populated.requests.count(listing)
    assert names(await provider.list_vms({})) == ["db-1", "web-1", "web-2"]
    assert populated.requests.count(listing) - before == 2      # one page per zone
    with pytest.raises(InvalidArgument) as err:
        await provider.list_vms({"region": "x"})
    assert err.value.field == "filter.region"
    await provider.close()


async def test_instance_info_with_disks(populated, gcs_emulator):
    provider = make_provider(populated, gcs_emulator)
    vm = await provider.get_vm("us-central1-a/web-1")
    assert (vm.name, vm.cpus, vm.memory_mb, vm.firmware, vm.power_state) == \
        ("web-1", 2, 8192, "uefi", "poweredOn")
    assert vm.tags == ["env=prod"] and vm.guest_os == "debian-12-bookworm"
    assert [(d.label, d.capacity_bytes, d.boot_order, d.controller) for d in vm.disks] == \
        [("web-1-boot", 1 << 30, 1, "scsi"), ("web-1-data", 1 << 30, None, "scsi")]
    assert vm.disks[0].location == "zones/us-central1-a/disks/web-1-boot"
    assert vm.nics[0].network == "default"
    assert (await provider.get_vm("web-2")).datacenter == "europe-west1-b"
    assert (await provider.get_vm(vm.uuid)).name == "web-1"
    with pytest.raises(NotFound, match="did you mean .*web-1"):
        await provider.get_vm("web-9")
    with pytest.raises(NotFound):
        await provider.get_vm("us-central1-a/nope")
    await provider.close()


async def test_export_downloads_each_disk_and_deletes_what_it_made(populated, gcs_emulator,
                                                                   tmp_path):
    provider = make_provider(populated, gcs_emulator)
    target = tmp_path / "out"
    target.mkdir()
    sink = FakeExportSink()
    options = ExportOptions(shutdown_vm=True, restore_power_state=True, chunk_size=256 * 1024)
    vm, disks = await provider.export_disks("us-central1-a/web-1", target, options, sink)

    assert [d.label for d in disks] == ["web-1-boot", "web-1-data"]
    for disk in disks:
        expected = populated.disk_content[disk.label]
        assert disk.path.read_bytes() == expected
        assert disk.sha256 == hashlib.sha256(expected).hexdigest()
        assert disk.format == "qcow2" and disk.file_bytes == len(expected)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk.path)],
                                         check=True, capture_output=True, text=True).stdout)
        assert info["format"] == "qcow2"
    assert sorted(p.name for p in target.iterdir()) == sorted(d.path.name for d in disks)
    assert sink.done == sink.total == sum(d.file_bytes for d in disks)
    # everything we created is gone: images and bucket objects
    assert populated.images == {} and len(populated.deleted_images) == 2
    assert list(storage_client(gcs_emulator).list_blobs(BUCKET, prefix="hypersdk/")) == []
    # stopped for a clean copy, then started again
    actions = [r for r in populated.requests if r.endswith(("/stop", "/start"))]
    assert [a.rpartition("/")[2] for a in actions] == ["stop", "start"]
    assert populated.force_flags == ["false", "false"]
    await provider.close()


async def test_failed_export_leaves_nothing_behind(populated, gcs_emulator, tmp_path):
    populated.build_outcome = "FAILURE"
    provider = make_provider(populated, gcs_emulator)
    target = tmp_path / "out"
    target.mkdir()
    sink = FakeExportSink()
    with pytest.raises(Failed, match="ended FAILURE"):
        await provider.export_disks("web-1", target, ExportOptions(), sink)
    assert list(target.iterdir()) == []
    assert populated.images == {}
    # the VM kept running, so the images were force-created and the log says why
    assert populated.force_flags == ["true", "true"]
    assert any("crash-consistent" in line for line in sink.lines)
    await provider.close()


async def test_export_needs_a_bucket(populated, gcs_emulator, tmp_path):
    provider = make_provider(populated, gcs_emulator, export_bucket="")
    with pytest.raises(InvalidArgument, match="providers.gcp.export_bucket"):
        await provider.export_disks("web-1", tmp_path, ExportOptions(), FakeExportSink())


def service_account_file(tmp_path: Path, token_uri: str, mode: int):
    """A throwaway service-account key file; returns (path, public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"type": "service_account", "project_id": PROJECT,
                                "private_key_id": "k1", "private_key": pem,
                                "client_email": "exporter@proj-1.iam.gserviceaccount.com",
                                "client_id": "1", "token_uri": token_uri}))
    path.chmod(mode)
    return path, key.public_key()


async def test_service_account_file_is_used_and_unknown_key_is_refused(populated, gcs_emulator,
                                                                       tmp_path):
    populated.required_token = "granted-token"
    key_file, public_key = service_account_file(tmp_path, f"{populated.url}/token", 0o600)
    provider = make_provider(populated, gcs_emulator, anonymous=False,
                             credentials_file=str(key_file))
    populated.trusted_key = public_key
    assert [vm.name for vm in await provider.list_vms({"zone": "europe-west1-b"})] == ["web-2"]

    populated.trusted_key = None  # the key was deleted on the server side
    with pytest.raises(NotAuthorized) as err:
        await provider.list_vms({})
    assert "PRIVATE KEY" not in str(err.value) and "was refused" in str(err.value)
    await provider.close()


async def test_wrong_token_is_not_authorized(populated, gcs_emulator):
    populated.required_token = "something-else"
    provider = make_provider(populated, gcs_emulator)
    with pytest.raises(NotAuthorized, match="credentials were refused"):
        await provider.get_vm("us-central1-a/web-1")
    await provider.close()


def test_credentials_file_readable_by_others_is_refused_at_config_time(tmp_path):
    key_file, _ = service_account_file(tmp_path, "http://127.0.0.1:1/token", 0o644)
    with pytest.raises(ConfigError) as err:
        parse_config({"providers": {"gcp": {"project": PROJECT,
                                            "credentials_file": str(key_file)}}}, "test")
    assert "providers.gcp.credentials_file" in str(err.value)
    assert "0600 or stricter" in str(err.value) and "0644" in str(err.value)


async def test_missing_extra_is_unavailable_naming_it(monkeypatch, fake_compute, gcs_emulator):
    from hypersdk.service.errors import Unavailable
    from hypersdk.service.providers.registry import ProviderRegistry

    monkeypatch.setitem(sys.modules, "google.cloud.compute_v1", None)
    provider = make_provider(fake_compute, gcs_emulator)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[gcp\]"):
        await provider.list_vms({})
    registry = ProviderRegistry(provider.config)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[gcp\]"):
        registry.check_usable("gcp")
    [row] = [r for r in registry.capabilities() if r["name"] == "gcp"]
    assert row["available"] is False and "hypersdk[gcp]" in row["reason"]


async def _until_a_build_starts(populated) -> None:
    await until(lambda: populated.builds, what="an image build")


async def test_cancelled_export_cancels_the_build_and_deletes_the_image(populated, gcs_emulator,
                                                                        tmp_path):
    populated.build_outcome = "HANG"
    provider = make_provider(populated, gcs_emulator)
    target = tmp_path / "out"
    target.mkdir()
    task = asyncio.ensure_future(provider.export_disks("web-2", target, ExportOptions(),
                                                       FakeExportSink()))
    await _until_a_build_starts(populated)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [b["status"] for b in populated.builds.values()] == ["CANCELLED"]
    assert populated.images == {} and list(target.iterdir()) == []
    await provider.close()


async def test_a_cancel_while_the_build_is_being_started_still_cancels_it(populated,
                                                                        gcs_emulator, tmp_path):
    """The build exists, its answer (with its id) is on the way when the export is
    cancelled: the provider waits for the id and cancels that build before it stops."""
    populated.build_outcome = "HANG"
    populated.build_reply_gate = asyncio.Event()
    provider = make_provider(populated, gcs_emulator)
    task = asyncio.ensure_future(provider.export_disks("web-2", tmp_path / "x", ExportOptions(),
                                                       FakeExportSink()))
    try:
        await _until_a_build_starts(populated)
        task.cancel()
        populated.build_reply_gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [b["status"] for b in populated.builds.values()] == ["CANCELLED"]
        await until(lambda: not populated.images, what="the image deleted")
    finally:
        populated.build_reply_gate.set()
        await provider.close()


async def test_dropped_connection_during_the_gcs_download_is_resumed(populated, gcs_emulator,
                                                                     tmp_path):
    from ..vsphere.fault_proxy import FaultInjectingProxy

    host, port = gcs_emulator.removeprefix("http://").split(":")
    proxy = await FaultInjectingProxy(host, int(port), cut_after=100_000, cuts=1).start()
    provider = make_provider(populated, gcs_emulator,
                             storage_endpoint=f"http://127.0.0.1:{proxy.port}")
    target = tmp_path / "out"
    target.mkdir()
    sink = FakeExportSink()
    try:
        vm, disks = await provider.export_disks("web-1", target,
                                                ExportOptions(chunk_size=256 * 1024), sink)
    finally:
        await proxy.close()
        await provider.close()
    assert proxy.cuts_done == 1
    assert any("resuming" in line for line in sink.lines)
    for disk in disks:
        assert disk.path.read_bytes() == populated.disk_content[disk.label]


async def test_a_second_cancel_during_cleanup_still_deletes_the_image(populated, gcs_emulator,
                                                                     tmp_path):
    populated.build_outcome = "HANG"
    provider = make_provider(populated, gcs_emulator)
    task = asyncio.ensure_future(provider.export_disks("web-2", tmp_path / "x", ExportOptions(),
                                                       FakeExportSink()))
    await _until_a_build_starts(populated)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()                       # impatient: cancelled again while cleaning up
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: not populated.images, what="the image deleted")
    assert populated.deleted_images
    await provider.close()
