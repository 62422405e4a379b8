"""Discovery and VM details against the govmomi simulator through real pyvmomi."""
from __future__ import annotations

import os

import pytest
from pyVmomi import vim

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.errors import InvalidArgument, NotFound, Unavailable
from hypersdk.service.providers.vsphere import VSphereProvider
from tests.vcsim.harness import Simulator, find_vm, power_off, wait_task

from .conftest import make_config
from .vapi import attach_tag


async def test_list_returns_every_vm_with_details(provider):
    vms = await provider.list_vms({})
    assert sorted(vm.name for vm in vms) == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1",
                                             "DC0_H0_VM0", "DC0_H0_VM1"]
    vm = next(vm for vm in vms if vm.name == "DC0_H0_VM0")
    assert vm.identifier.startswith("vm-")
    assert vm.path == "DC0/vm/DC0_H0_VM0"
    assert vm.datacenter == "DC0" and vm.power_state == "poweredOn"
    assert len(vm.uuid) == 36 and vm.cpus == 1 and vm.memory_mb == 32 and vm.firmware == "bios"
    assert vm.disks[0].location == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
    assert vm.disks[0].capacity_bytes == 1 << 20 and vm.disks[0].controller == "scsi"
    assert vm.nics[0].mac and vm.nics[0].network == "DC0_DVPG0" and vm.nics[0].adapter == "e1000"
    assert vm.extra["cdroms"] == 1


async def test_filter_by_power_state(provider, si):
    power_off(find_vm(si, "DC0_H0_VM1"))
    off = await provider.list_vms({"power_state": "poweredOff"})
    assert [vm.name for vm in off] == ["DC0_H0_VM1"]
    on = await provider.list_vms({"status": "poweredOn"})
    assert "DC0_H0_VM1" not in {vm.name for vm in on} and len(on) == 3
    assert await provider.list_vms({"power_state": "suspended"}) == []


async def test_filter_by_name_pattern_and_datacenter(provider):
    assert {vm.name for vm in await provider.list_vms({"name": "DC0_C0_*"})} == {
        "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"}
    assert len(await provider.list_vms({"datacenter": "DC0"})) == 4
    assert await provider.list_vms({"datacenter": "DC9"}) == []


async def test_filter_by_folder(provider, si):
    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    folder = datacenter.vmFolder.CreateFolder("prod")
    vm = find_vm(si, "DC0_H0_VM1")
    wait_task(folder.MoveIntoFolder_Task([vm]))
    found = await provider.list_vms({"folder": "/DC0/vm/prod/"})
    assert [(v.name, v.path) for v in found] == [("DC0_H0_VM1", "DC0/vm/prod/DC0_H0_VM1")]


async def test_filter_by_tags_from_custom_attributes(provider, si):
    content = si.RetrieveContent()
    field = content.customFieldsManager.AddCustomFieldDef(name="env", moType=vim.VirtualMachine)
    content.customFieldsManager.SetField(entity=find_vm(si, "DC0_H0_VM0"), key=field.key,
                                         value="prod")
    tagged = await provider.list_vms({"tags": ["env=prod"]})
    assert [vm.name for vm in tagged] == ["DC0_H0_VM0"] and tagged[0].tags == ["env=prod"]
    assert [vm.name for vm in await provider.list_vms({"tags": "env"})] == ["DC0_H0_VM0"]
    assert await provider.list_vms({"tags": ["env=test"]}) == []


@pytest.mark.parametrize("bad, field", [
    ({"colour": "red"}, "filter.colour"),
    ({"power_state": "on"}, "filter.power_state"),
    ({"status": "running"}, "filter.status"),
    ({"name": ""}, "filter.name"),
    ({"tags": [1]}, "filter.tags"),
])
async def test_bad_filters_name_the_key(provider, bad, field):
    with pytest.raises(InvalidArgument) as err:
        await provider.list_vms(bad)
    assert err.value.field == field


async def test_get_vm_by_id_name_and_path(provider):
    by_name = await provider.get_vm("DC0_H0_VM1")
    assert (await provider.get_vm(by_name.identifier)).name == "DC0_H0_VM1"
    assert (await provider.get_vm("DC0/vm/DC0_H0_VM1")).identifier == by_name.identifier
    assert (await provider.get_vm("/DC0/vm/DC0_H0_VM1")).identifier == by_name.identifier


async def test_unknown_vm_suggests_close_names(provider):
    with pytest.raises(NotFound, match=r"no VM 'DC0_H0_VM7'.*did you mean .*DC0_H0_VM"):
        await provider.get_vm("DC0_H0_VM7")


async def test_sessions_are_pooled_and_reused(provider):
    for _ in range(5):
        await provider.list_vms({})
    assert provider.pool._created == 1


async def test_expired_session_logs_in_again(provider, sim):
    await provider.list_vms({})
    [si] = provider.pool._all
    si.content.sessionManager.Logout()
    assert len(await provider.list_vms({})) == 4


async def test_wrong_password_fails_fast_naming_host(tmp_path, sim):
    config = make_config(tmp_path, sim, password="not-the-password")
    provider = VSphereProvider("vsphere", config.providers["vsphere"], config)
    with pytest.raises(Unavailable, match=rf"vSphere {sim.host}:{sim.port}: login refused for "
                                          r"user 'user' \(wrong user name or password\)") as err:
        await provider.list_vms({})
    assert "not-the-password" not in str(err.value)


async def test_unreachable_host_fails_fast(tmp_path, sim):
    config = make_config(tmp_path, sim, port=1, timeout="5s")
    provider = VSphereProvider("vsphere", config.providers["vsphere"], config)
    with pytest.raises(Unavailable, match=rf"vSphere {sim.host}:1 is unreachable: .*refused"):
        await provider.list_vms({})


async def test_untrusted_certificate_names_host(tmp_path, vcsim_binary):
    with Simulator(tls=True) as tls_sim:
        config = make_config(tmp_path, tls_sim, insecure=False)
        provider = VSphereProvider("vsphere", config.providers["vsphere"], config)
        with pytest.raises(Unavailable, match=rf"vSphere {tls_sim.host}:{tls_sim.port}: the TLS "
                                              r"certificate is not trusted .*insecure: true"):
            await provider.list_vms({})
        config = make_config(tmp_path, tls_sim, insecure=True)
        trusting = VSphereProvider("vsphere", config.providers["vsphere"], config)
        assert len(await trusting.list_vms({})) == 4
        await trusting.close()


def test_password_file_must_be_private(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("pass\n")
    os.chmod(secret, 0o644)
    section = {"host": "vc.example", "username": "u", "password_file": str(secret)}
    with pytest.raises(ConfigError, match=r"providers.vsphere.password_file: expected .*0600"):
        parse_config({"providers": {"vsphere": section}}, "(test)", env={})
    os.chmod(secret, 0o600)
    config = parse_config({"providers": {"vsphere": section}}, "(test)", env={})
    assert config.providers["vsphere"]["port"] == 443
    assert config.providers["vsphere"]["insecure"] is False


async def test_password_file_is_used(tmp_path, sim):
    secret = tmp_path / "pw"
    secret.write_text(sim.password + "\n")
    os.chmod(secret, 0o600)
    config = make_config(tmp_path, sim, password="", password_file=str(secret))
    provider = VSphereProvider("vsphere", config.providers["vsphere"], config)
    assert len(await provider.list_vms({})) == 4
    await provider.close()


async def test_listing_is_one_property_collector_round_trip(tmp_path, vcsim_binary, monkeypatch):
    """The number of SOAP calls does not grow with the number of VMs."""
    from pyVmomi.SoapAdapter import SoapStubAdapter

    calls: list[str] = []
    real = SoapStubAdapter.InvokeMethod

    def counting(self, mo, info, args, *rest):
        calls.append(info.name)
        return real(self, mo, info, args, *rest)

    counts = {}
    for vms in (1, 8):
        with Simulator(vms=vms) as big:
            config = make_config(tmp_path, big)
            provider = VSphereProvider("vsphere", config.providers["vsphere"], config)
            await provider.list_vms({})  # logs in
            monkeypatch.setattr(SoapStubAdapter, "InvokeMethod", counting)
            found = await provider.list_vms({})
            monkeypatch.setattr(SoapStubAdapter, "InvokeMethod", real)
            assert len(found) == vms * 2
            counts[vms] = list(calls)
            calls.clear()
            await provider.close()
    assert counts[1] == counts[8]
    assert counts[8].count("RetrievePropertiesEx") == 1 and len(counts[8]) <= 4


async def test_vsphere_tags_from_the_rest_api(provider, sim):
    vm = await provider.get_vm("DC0_C0_RP0_VM1")
    attach_tag(sim, vm.identifier, "tier", "gold")
    tagged = await provider.list_vms({"tags": "tier=gold"})
    assert [(v.name, v.tags) for v in tagged] == [("DC0_C0_RP0_VM1", ["tier=gold"])]
    assert [v.name for v in await provider.list_vms({"tags": ["tier"]})] == ["DC0_C0_RP0_VM1"]
    assert "tags_unavailable" not in tagged[0].extra


async def test_server_without_tags_api_means_no_tags():
    """A plain ESXi host has no /rest: TagsUnavailable, which the provider takes as 'no tags'."""
    from aiohttp import web

    from hypersdk.service.providers.vsphere_session import SessionPool
    from hypersdk.service.providers.vsphere_tags import TagsUnavailable, fetch_vm_tags

    runner = web.AppRunner(web.Application())  # answers 404 to everything
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = SessionPool("esx", {"host": "127.0.0.1", "port": port, "protocol": "http",
                               "username": "root", "password": "pw", "insecure": True,
                               "timeout": 5.0, "connection_pool_size": 1})
    try:
        with pytest.raises(TagsUnavailable, match="HTTP 404"):
            await fetch_vm_tags(pool, ["vm-1"])
    finally:
        await runner.cleanup()
