"""The Hyper-V provider through the real pywinrm client against FakeWinRMServer."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotAuthorized, NotFound, Unavailable
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.hyperv import HypervProvider

from ..support.fake_sink import FakeExportSink
from .conftest import PASSWORD, USER


def make_provider(fake, **overrides) -> HypervProvider:
    host, _, port = fake.url.partition(":")
    section = {"type": "hyperv", "host": host, "port": int(port), "scheme": "http",
               "transport": "basic", "username": USER, "password": PASSWORD,
               "read_chunk": "256KiB", **overrides}
    config = parse_config({"providers": {"hv": section}}, "test")
    return HypervProvider("hv", config.providers["hv"], config)


@pytest.fixture
def host(fake_winrm):
    fake_winrm.add_vm("web01", {"web01.vhdx": os.urandom(700_000),
                                "web01-data.vhdx": os.urandom(300_000)})
    fake_winrm.add_vm("legacy", {"legacy.vhd": os.urandom(5000)}, generation=1, state="Off",
                      cpus=1, memory_mb=1024)
    return fake_winrm


async def test_list_vms_reads_generation_disks_and_nics(host):
    provider = make_provider(host)
    vms = {vm.name: vm for vm in await provider.list_vms({})}
    web, legacy = vms["web01"], vms["legacy"]
    assert (web.firmware, web.secure_boot, web.cpus, web.memory_mb, web.power_state) == \
        ("uefi", True, 2, 4096, "poweredOn")
    assert (legacy.firmware, legacy.power_state, legacy.extra["generation"]) == \
        ("bios", "poweredOff", 1)
    assert [(d.label, d.controller, d.boot_order) for d in web.disks] == \
        [("web01.vhdx", "scsi", 1), ("web01-data.vhdx", "scsi", None)]
    assert web.nics[0].mac == "00:15:5d:0a:0b:0c" and web.nics[0].network == "External"
    assert [vm.name for vm in await provider.list_vms({"generation": 1})] == ["legacy"]
    assert [vm.name for vm in await provider.list_vms({"power_state": "poweredOn"})] == ["web01"]
    with pytest.raises(InvalidArgument, match="filter.zone"):
        await provider.list_vms({"zone": "x"})
    assert (await provider.get_vm(web.identifier)).name == "web01"
    with pytest.raises(NotFound, match="did you mean web01"):
        await provider.get_vm("web1")


async def test_export_fetches_vhdx_in_chunks_and_checks_host_hash(host, tmp_path):
    provider = make_provider(host)
    sink = FakeExportSink()
    options = ExportOptions(shutdown_vm=True, restore_power_state=True)
    vm, disks = await provider.export_disks("web01", tmp_path, options, sink)
    assert [d.label for d in disks] == ["web01.vhdx", "web01-data.vhdx"]
    for disk, source in zip(disks, vm.disks):
        expected = host.files[source.location.lower()]
        assert disk.path.read_bytes() == expected
        assert disk.sha256 == hashlib.sha256(expected).hexdigest() and disk.format == "vhdx"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.path.name for d in disks)
    assert host.ops.count("read_chunk") == 3 + 2          # 256 KiB chunks
    assert host.ops[1] == "stop_vm" and host.ops[-1] == "start_vm"
    assert host.exported_files() == []                     # host export folder removed
    assert sink.done == sink.total == 1_000_000
    assert not any(PASSWORD in line for line in sink.lines)


async def test_dropped_connection_during_a_chunk_is_read_again(host, tmp_path):
    provider = make_provider(host)
    host.drop_receives = 0
    sink = FakeExportSink()
    original = host.op_read_chunk
    calls = []

    def flaky(params):   # drop the connection the first time the second chunk is read
        calls.append(params["offset"])
        if params["offset"] and calls.count(params["offset"]) == 1:
            host.drop_receives = 1
        return original(params)

    host.op_read_chunk = flaky
    vm, disks = await provider.export_disks("web01", tmp_path, ExportOptions(), sink)
    assert disks[0].path.read_bytes() == host.files[vm.disks[0].location.lower()]
    assert any("resuming" in line for line in sink.lines)


async def test_hash_mismatch_fails_and_leaves_nothing(host, tmp_path):
    host.corrupt_hash = True
    provider = make_provider(host)
    with pytest.raises(Failed, match="differs from the host's Get-FileHash"):
        await provider.export_disks("legacy", tmp_path, ExportOptions(), FakeExportSink())
    assert list(tmp_path.iterdir()) == [] and host.exported_files() == []


async def test_wrong_password_is_not_authorized(host):
    provider = make_provider(host, password="Wr0ng-Pa55")
    with pytest.raises(NotAuthorized) as err:
        await provider.list_vms({})
    assert "Wr0ng-Pa55" not in str(err.value) and USER in str(err.value)


async def test_unreachable_host_is_unavailable():
    provider = make_provider(type("Dead", (), {"url": "127.0.0.1:9"})(),
                             operation_timeout="2s")
    with pytest.raises(Unavailable, match="cannot reach 127.0.0.1"):
        await provider.list_vms({})


def test_password_file_must_be_private(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"providers\.hv\.password_file"):
        parse_config({"providers": {"hv": {"type": "hyperv", "host": "h",
                                           "password_file": str(secret)}}}, "test")


async def test_missing_extra_is_unavailable_naming_it(monkeypatch, fake_winrm):
    from hypersdk.service.providers.registry import ProviderRegistry

    monkeypatch.setitem(sys.modules, "winrm", None)
    provider = make_provider(fake_winrm)
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[hyperv\]"):
        await provider.list_vms({})
    with pytest.raises(Unavailable, match=r"pip install hypersdk\[hyperv\]"):
        ProviderRegistry(provider.config).check_usable("hv")


async def test_a_vm_name_cannot_place_files_outside_the_target(fake_winrm, tmp_path):
    fake_winrm.add_vm("../../evil", {"evil.vhdx": b"e" * 5000})
    target = tmp_path / "out"
    target.mkdir()
    provider = make_provider(fake_winrm)
    _, [disk] = await provider.export_disks("../../evil", target, ExportOptions(),
                                            FakeExportSink())
    assert disk.path.parent == target and [p.name for p in tmp_path.iterdir()] == ["out"]


async def test_https_with_the_hosts_ca_works_and_an_untrusted_certificate_is_refused(
        fake_winrm_tls, tmp_path):
    fake_winrm_tls.add_vm("tls01", {"tls01.vhdx": b"t" * 9000})
    provider = make_provider(fake_winrm_tls, scheme="https", ca_file=fake_winrm_tls.ca_file)
    [vm] = await provider.list_vms({})
    _, [disk] = await provider.export_disks(vm.identifier, tmp_path, ExportOptions(),
                                            FakeExportSink())
    assert disk.path.read_bytes() == b"t" * 9000

    untrusted = make_provider(fake_winrm_tls, scheme="https")
    with pytest.raises(NotAuthorized, match="TLS certificate of 127.0.0.1 is not trusted"):
        await untrusted.list_vms({})


async def test_a_busy_host_is_retried_with_backoff(host):
    host.busy = 2
    provider = make_provider(host, busy_retry_delay="10ms")
    assert len(await provider.list_vms({})) == 2
    assert host.creates == 3

    host.busy = 10
    with pytest.raises(Failed, match="Code 503"):
        await provider.list_vms({})
