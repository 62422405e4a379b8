"""vSphere tags are optional: when the vAPI REST service cannot be read, listings, VM details
and exports go on without them, with one warning per provider session saying why.

The simulator sits behind a real proxy that refuses the vAPI paths (/rest, /api) in the
ways a vCenter's front can: a reset connection, 403, a proxy's 502 page, no answer."""
from __future__ import annotations

import logging
import re

import pytest
from pyVmomi import vim

from hypersdk.service.providers import vsphere_tags
from hypersdk.service.providers.registry import ProviderRegistry
from hypersdk.service.providers.vsphere import VSphereProvider
from tests.vcsim.harness import find_vm

from .conftest import EXPORT_VM, make_config
from .fake_context import job_context, run_job
from .fault_proxy import FaultInjectingProxy
from .helpers import KIND, definition
from .vapi import attach_tag

TAGS_LOGGER = "hypersdk.service.providers.vsphere_tags"
REFUSALS = [("reset", r"/rest: .*(disconnected|reset)"),
            ("forbidden", r"tags login: HTTP 403 Forbidden"),
            ("bad-gateway", r"tags login: HTTP 502 Bad Gateway"),
            ("hang", r"/rest: no answer within 2s")]


async def refusing_proxy(sim, refusal: str) -> FaultInjectingProxy:
    return await FaultInjectingProxy(sim.host, sim.port, refuse_paths=("/rest", "/api"),
                                     refusal=refusal).start()


def behind(tmp_path, sim, proxy: FaultInjectingProxy) -> VSphereProvider:
    config = make_config(tmp_path, sim, port=proxy.port, timeout="2s")
    return VSphereProvider("vsphere", config.providers["vsphere"], config)


def tag_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == TAGS_LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("refusal, reason", REFUSALS)
async def test_listing_and_details_go_on_without_tags(tmp_path, sim, si, caplog, refusal,
                                                      reason):
    content = si.RetrieveContent()
    field = content.customFieldsManager.AddCustomFieldDef(name="env", moType=vim.VirtualMachine)
    content.customFieldsManager.SetField(entity=find_vm(si, "DC0_H0_VM0"), key=field.key,
                                         value="prod")
    proxy = await refusing_proxy(sim, refusal)
    where = f"vSphere {sim.host}:{proxy.port}"
    provider = behind(tmp_path, sim, proxy)
    try:
        vms = await provider.list_vms({})
        assert len(vms) == 4
        assert {vm.name: vm.tags for vm in vms}["DC0_H0_VM0"] == ["env=prod"]
        vm = await provider.get_vm("DC0_H0_VM0")
        assert [v.name for v in await provider.list_vms({"tags": "env=prod"})] == ["DC0_H0_VM0"]
    finally:
        await provider.close()
        await proxy.close()
    assert vm.tags == ["env=prod"]
    problem = vm.extra["tags_unavailable"]
    assert problem.startswith("the vSphere tags could not be read (")
    assert re.search(reason, problem), problem
    [warning] = tag_warnings(caplog)  # once per provider session, however often it is asked
    assert warning.startswith(f"{where}: {problem}; VMs are listed and exported without them")
    assert proxy.refused == 1  # not asked again within RETRY_INTERVAL


async def test_tags_come_back_when_the_service_answers_again(tmp_path, sim, caplog,
                                                             monkeypatch):
    monkeypatch.setattr(vsphere_tags, "RETRY_INTERVAL", 0.0)
    proxy = await refusing_proxy(sim, "forbidden")
    provider = behind(tmp_path, sim, proxy)
    try:
        vm = await provider.get_vm("DC0_C0_RP0_VM1")
        attach_tag(sim, vm.identifier, "tier", "gold")
        for _ in range(3):
            assert (await provider.get_vm(vm.identifier)).tags == []
        proxy.refuse_paths = ()
        again = await provider.get_vm(vm.identifier)
    finally:
        await provider.close()
        await proxy.close()
    assert proxy.refused == 4 and len(tag_warnings(caplog)) == 1
    assert again.tags == ["tier=gold"] and "tags_unavailable" not in again.extra


async def test_export_goes_on_and_its_log_says_why(tmp_path, sim, uploaded, caplog):
    proxy = await refusing_proxy(sim, "bad-gateway")
    config = make_config(tmp_path, sim, port=proxy.port, timeout="2s")
    registry = ProviderRegistry(config)
    try:
        ctx = job_context(KIND, definition(), config, registry)
        result = await run_job(KIND, ctx)
    finally:
        await registry.close()
        await proxy.close()
    assert result["ova"].endswith(f"{EXPORT_VM}.ova") and result["vm"]["tags"] == []
    [warned] = [m for level, m in ctx.lines if level == "warning"]
    assert warned == (f"{EXPORT_VM}: the vSphere tags could not be read (tags login: HTTP 502 "
                      f"Bad Gateway); exporting without them")
    assert len(tag_warnings(caplog)) == 1
