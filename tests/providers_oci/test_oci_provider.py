"""The OCI provider through the real oci SDK (signed requests) against FakeOciServer."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotAuthorized, NotFound
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.oci import OciProvider

from ..support.fake_sink import FakeExportSink
from ..support.wait import until
from .conftest import COMPARTMENT, FINGERPRINT, TENANCY, USER, make_api_key


def make_provider(fake, key_file, *, max_retries: int = 3, **overrides) -> OciProvider:
    section = {"type": "oci", "compartment_id": COMPARTMENT, "tenancy": TENANCY, "user": USER,
               "fingerprint": FINGERPRINT, "key_file": str(key_file), "region": "us-phoenix-1",
               "export_bucket": "exports", "compute_endpoint": f"{fake.url}/20160918",
               "objectstorage_endpoint": fake.url, "poll_interval": "10ms", **overrides}
    config = parse_config({"providers": {"oci": section},
                           "export": {"max_retries": max_retries}}, "test")
    return OciProvider("oci", config.providers["oci"], config)


@pytest.fixture
def populated(fake_oci):
    fake_oci.add_instance("app-1", os.urandom(3 << 20), tags={"team": "red"}, uefi=True,
                          block_volumes=1)
    fake_oci.add_instance("app-2", os.urandom(4096), tags={"team": "blue"}, state="STOPPED")
    fake_oci.add_instance("db-1", os.urandom(4096), tags={"team": "red"})
    return fake_oci


async def test_list_instances_with_filters(populated, api_key):
    provider = make_provider(populated, api_key.key_file)
    names = lambda vms: sorted(vm.name for vm in vms)  # noqa: E731
    assert names(await provider.list_vms({})) == ["app-1", "app-2", "db-1"]
    assert names(await provider.list_vms({"tags": {"team": "red"}})) == ["app-1", "db-1"]
    assert names(await provider.list_vms({"name": "app-*"})) == ["app-1", "app-2"]
    assert names(await provider.list_vms({"power_state": "poweredOff"})) == ["app-2"]
    with pytest.raises(InvalidArgument) as err:
        await provider.list_vms({"labels": {}})
    assert err.value.field == "filter.labels"


async def test_list_follows_pages(populated, api_key):
    populated.page_size = 2
    provider = make_provider(populated, api_key.key_file)
    assert len(await provider.list_vms({})) == 3
    assert sum(call == "GET /20160918/instances" for _, call in populated.calls) == 2


async def test_instance_info_has_boot_and_block_volumes(populated, api_key):
    provider = make_provider(populated, api_key.key_file)
    vm = await provider.get_vm("app-1")
    assert (vm.cpus, vm.memory_mb, vm.firmware, vm.power_state) == (4, 16384, "uefi", "poweredOn")
    assert [(d.key, d.capacity_bytes, d.boot_order) for d in vm.disks] == \
        [("boot", 47 << 30, 1), ("volume-0", 100 << 30, None)]
    assert vm.disks[1].controller == "paravirtualized" and vm.guest_os == "Oracle Linux 8"
    assert [nic.mac for nic in vm.nics] == ["02:00:17:aa:bb:cc"]
    assert (await provider.get_vm(vm.identifier)).name == "app-1"
    with pytest.raises(NotFound, match="did you mean.*app-1"):
        await provider.get_vm("app-9")


async def test_export_downloads_through_a_par_and_cleans_up(populated, api_key, tmp_path):
    provider = make_provider(populated, api_key.key_file)
    sink = FakeExportSink()
    vm, disks = await provider.export_disks("app-1", tmp_path, ExportOptions(chunk_size=65536),
                                            sink)
    [disk] = disks
    boot_id = vm.disks[0].location
    expected = populated.disk_content[boot_id]
    assert disk.path.read_bytes() == expected
    assert disk.sha256 == hashlib.sha256(expected).hexdigest()
    assert disk.format == "qcow2" and disk.boot_order == 1
    assert [p.name for p in tmp_path.iterdir() if p.name != "api_key.pem"] == [disk.path.name]
    assert sink.done == sink.total == len(expected)
    # image, exported object and PAR are all gone
    assert populated.images == {} and populated.objects == {} and populated.pars == {}
    # the block volume is named as not exported; the PAR URL (a secret) is never shown
    assert any("not exported" in line for line in sink.lines)
    assert not any("/p/" in line for line in sink.lines)


async def test_dropped_connection_mid_download_is_resumed(populated, api_key, tmp_path):
    populated.drop_after = 1_000_000
    provider = make_provider(populated, api_key.key_file)
    sink = FakeExportSink()
    vm, [disk] = await provider.export_disks("app-1", tmp_path, ExportOptions(), sink)
    assert disk.path.read_bytes() == populated.disk_content[vm.disks[0].location]
    assert populated.par_gets[0] == "" and populated.par_gets[1].startswith("bytes=")
    assert int(populated.par_gets[1][6:].rstrip("-")) >= 1  # resumed, not restarted
    assert any("resumed at byte" in line for line in sink.lines)
    assert not any("/p/" in line for line in sink.lines)


async def test_throttling_honours_retry_after(populated, api_key):
    populated.throttle = [1.0]
    provider = make_provider(populated, api_key.key_file)
    assert len(await provider.list_vms({"name": "db-*"})) == 1
    (t0, first), (t1, second) = populated.calls[:2]
    assert first == second == "GET /20160918/instances"
    assert t1 - t0 >= 0.95


async def test_throttling_beyond_max_retries_fails_clearly(populated, api_key):
    populated.throttle = [0.05] * 5
    provider = make_provider(populated, api_key.key_file, max_retries=2)
    with pytest.raises(Failed, match="TooManyRequests"):
        await provider.list_vms({})


async def test_unknown_key_is_not_authorized(populated, tmp_path):
    other = make_api_key(tmp_path, "other.pem")   # a key the server does not know
    provider = make_provider(populated, other.key_file)
    with pytest.raises(NotAuthorized, match="HTTP 401") as err:
        await provider.list_vms({})
    assert "PRIVATE KEY" not in str(err.value)


async def test_failed_export_removes_image_and_partial_files(populated, api_key, tmp_path):
    populated.export_fails = True
    provider = make_provider(populated, api_key.key_file)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Failed, match="exporting the image failed"):
        await provider.export_disks("app-1", out, ExportOptions(), FakeExportSink())
    assert list(out.iterdir()) == [] and populated.images == {}


def test_key_file_readable_by_others_is_refused(api_key):
    api_key.key_file.chmod(0o640)
    with pytest.raises(ConfigError, match=r"providers\.oci\.key_file.*0600 or stricter"):
        parse_config({"providers": {"oci": {"compartment_id": COMPARTMENT,
                                            "key_file": str(api_key.key_file)}}}, "test")


async def test_missing_extra_is_unavailable_naming_it(monkeypatch, fake_oci, api_key):
    from hypersdk.service.errors import Unavailable
    from hypersdk.service.providers.registry import ProviderRegistry

    monkeypatch.setitem(sys.modules, "oci", None)
    provider = make_provider(fake_oci, api_key.key_file)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[oci\]"):
        await provider.list_vms({})
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[oci\]"):
        ProviderRegistry(provider.config).check_usable("oci")


async def test_cancelled_export_removes_image_and_object(populated, api_key, tmp_path):
    import asyncio

    populated.export_hangs = True
    provider = make_provider(populated, api_key.key_file)
    task = asyncio.ensure_future(provider.export_disks("app-1", tmp_path, ExportOptions(),
                                                       FakeExportSink()))
    await until(lambda: any(image["lifecycleState"] == "EXPORTING"
                            for image in populated.images.values()), what="an exporting image")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert populated.images == {} and populated.pars == {}
    assert any(call.startswith("DELETE /n/testns/b/exports/o/") for _, call in populated.calls)


@pytest.mark.parametrize("held, made", [("create_image", "images"), ("create_par", "pars")])
async def test_a_cancel_while_a_create_call_is_out_still_removes_what_it_made(populated, api_key,
                                                                              tmp_path, held, made):
    """The fake OCI makes the image (or PAR) at once and holds its answer; the export is
    cancelled meanwhile."""
    import asyncio

    populated.hold_answer[held] = asyncio.Event()
    provider = make_provider(populated, api_key.key_file)
    out = tmp_path / "out"
    out.mkdir()
    task = asyncio.ensure_future(provider.export_disks("app-1", out, ExportOptions(),
                                                       FakeExportSink()))
    await until(lambda: getattr(populated, made) or task.done(), what=f"a {held} call")
    task.cancel()
    populated.hold_answer[held].set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert populated.images == {} and populated.pars == {}
    assert list(out.iterdir()) == []


async def test_oci_config_file_is_used_and_its_key_mode_checked(populated, api_key, tmp_path):
    config_file = tmp_path / "oci_config"
    config_file.write_text(f"[work]\nuser={USER}\nfingerprint={FINGERPRINT}\n"
                           f"key_file={api_key.key_file}\ntenancy={TENANCY}\n"
                           "region=us-phoenix-1\n")
    provider = make_provider(populated, "", user="", tenancy="", fingerprint="", region="",
                             config_file=str(config_file), profile="work")
    assert len(await provider.list_vms({})) == 3

    api_key.key_file.chmod(0o644)
    provider = make_provider(populated, "", user="", tenancy="", fingerprint="", region="",
                             config_file=str(config_file), profile="work")
    with pytest.raises(InvalidArgument, match=r"\[work\] key_file.*0600 or stricter"):
        await provider.list_vms({})
