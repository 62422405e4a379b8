"""`providers.<vsphere>.host` may carry the port ("vc:8443", as users write it): the config
check takes it apart once, and SOAP, the datastore and the tags REST URLs all use it.
A port in both places must agree; anything that is not a host is refused naming the key."""
from __future__ import annotations

import pytest

from hypersdk.service.config import ConfigError, parse_config
from hypersdk.service.providers.vsphere import VSphereProvider
from hypersdk.service.providers.vsphere_export import _lease_url, datastore_url
from hypersdk.service.providers.vsphere_session import HOST_RULE, SessionPool

from .conftest import make_config
from .vapi import attach_tag


def pool_for(**section) -> SessionPool:
    section = {"host": "vc.example.com", "username": "u", "password": "p", **section}
    config = parse_config({"providers": {"vsphere": section}}, "(test)", env={})
    return SessionPool("vsphere", config.providers["vsphere"])


@pytest.mark.parametrize("section, host, port, base_url", [
    ({}, "vc.example.com", 443, "https://vc.example.com:443"),
    ({"host": "vc:8443"}, "vc", 8443, "https://vc:8443"),
    ({"host": "vc:8443", "port": 8443}, "vc", 8443, "https://vc:8443"),
    ({"host": "vc", "port": 8443}, "vc", 8443, "https://vc:8443"),
    ({"host": "10.1.2.3:9443", "protocol": "http"}, "10.1.2.3", 9443, "http://10.1.2.3:9443"),
    ({"host": "[fd00::1]:8443"}, "fd00::1", 8443, "https://[fd00::1]:8443"),
    ({"host": "fd00::1"}, "fd00::1", 443, "https://[fd00::1]:443"),
])
def test_host_with_or_without_port(section, host, port, base_url):
    pool = pool_for(**section)
    assert (pool.host, pool.port, pool.base_url) == (host, port, base_url)
    assert pool.where == f"vSphere {base_url.split('://')[1]}"
    assert datastore_url(pool, "[LocalDS_0] vm1/vm1.vmdk", "DC0") == (
        f"{base_url}/folder/vm1/vm1.vmdk?dcPath=DC0&dsName=LocalDS_0")
    assert _lease_url("https://*/nfc/52a1/disk-0.vmdk", pool.url_host) == (
        f"https://{pool.url_host}/nfc/52a1/disk-0.vmdk")


@pytest.mark.parametrize("section, key, rule", [
    ({"host": "vc:8443", "port": 9443}, "port", "the port written in host (8443) or no port"),
    ({"host": "https://vc.example.com"}, "host", HOST_RULE),
    ({"host": "vc/sdk"}, "host", HOST_RULE),
    ({"host": "vc:"}, "host", HOST_RULE),
    ({"host": "vc:0"}, "host", HOST_RULE),
    ({"host": "vc:65536"}, "host", HOST_RULE),
    ({"host": "user@vc"}, "host", HOST_RULE),
    ({"host": "vc", "port": 0}, "port", "a value >= 1"),
])
def test_bad_host_or_conflicting_port_is_refused(section, key, rule):
    with pytest.raises(ConfigError) as err:
        pool_for(**section)
    assert [str(p) for p in err.value.problems] == [
        f"config: providers.vsphere.{key}: expected {rule}, found {section[key]!r}"]


async def test_host_with_port_reaches_soap_and_the_tags_api(tmp_path, sim):
    """The simulator listens on a port other than 443: both SOAP and /rest must use it."""
    config = make_config(tmp_path, sim, host=f"{sim.host}:{sim.port}", port=None)
    settings = config.providers["vsphere"]
    assert (settings["host"], settings["port"]) == (sim.host, sim.port)
    provider = VSphereProvider("vsphere", settings, config)
    try:
        vm = await provider.get_vm("DC0_H0_VM1")
        attach_tag(sim, vm.identifier, "tier", "gold")
        tagged = await provider.get_vm(vm.identifier)
        [si] = provider.pool._all
        assert si._stub.host == f"{sim.host}:{sim.port}"
    finally:
        await provider.close()
    assert tagged.tags == ["tier=gold"] and "tags_unavailable" not in tagged.extra
