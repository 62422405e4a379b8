"""A plan's definition is read strictly: every bad field is named with its rule."""
from __future__ import annotations

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.errors import InvalidArgument
from hypersdk.service.plan_definition import validate_plan
from hypersdk.service.providers.registry import ProviderRegistry


@pytest.fixture
def config(tmp_path):
    return parse_config({"providers": {"vsphere": {"type": "vsphere", "host": "127.0.0.1",
                                                   "username": "u", "password": "p"}},
                         "paths": {"outputs": [str(tmp_path)]},
                         "targets": {"remote": {"uri": "qemu+ssh://kvm2/system",
                                                "pool": "default", "format": "raw"}}},
                        "(test)", env={})


def good(tmp_path, **changes) -> dict:
    plan = {"name": "weekend", "provider": "vsphere", "vms": ["vm-1", "vm-2"],
            "network_map": {"VM Network": {"network": "default"},
                            "DC0_DVPG0": {"bridge": "br0"}},
            "storage_map": {"LocalDS_0": {"directory": str(tmp_path / "a")}},
            "limits": {"per_plan": 3, "per_host": 2}}
    plan.update(changes)
    return {key: value for key, value in plan.items() if value is not None}


def refused(config, definition) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_plan(definition, config, ProviderRegistry(config))
    return caught.value.field, caught.value.rule


def test_a_good_plan_is_normalised(config, tmp_path):
    plan = validate_plan(good(tmp_path), config, ProviderRegistry(config))
    assert plan["storage_map"] == {"LocalDS_0": {"directory": str(tmp_path / "a"),
                                                 "format": "qcow2"}}
    assert plan["limits"] == {"per_plan": 3, "per_host": 2, "per_datastore": None}
    assert plan["network_map"]["DC0_DVPG0"] == {"bridge": "br0"}
    assert plan["filter"] is None and plan["vms"] == ["vm-1", "vm-2"]


def test_a_warm_plan_of_a_provider_that_cannot_falls_back_to_cold_saying_why(config, tmp_path):
    warm = validate_plan(good(tmp_path, warm=True, precopy_interval=600), config,
                         ProviderRegistry(config))
    assert (warm["warm"], warm["precopy_interval"], warm["warm_fallback"]) == (True, 600, "")
    cold = validate_plan(good(tmp_path, provider="ova", warm=True), config,
                         ProviderRegistry(config))
    assert cold["warm"] is False
    assert cold["warm_fallback"].startswith("provider 'ova' (ova) cannot do warm migration: ")
    assert cold["warm_fallback"].endswith("; the VMs migrate cold")


@pytest.mark.parametrize("changes, field, rule", [
    ({"warmth": True}, "warmth", "unknown field"),
    ({"precopy_interval": 60}, "precopy_interval", "needs warm: true"),
    ({"warm": True, "precopy_interval": 0}, "precopy_interval", "an integer >= 1"),
    ({"warm": True, "cutover_at": "02:00"}, "cutover_at", "an ISO 8601 time with a time zone"),
    ({"vms": "vm-1"}, "vms", "a non-empty list of strings"),
    ({"vms": ["vm-1", 7]}, "vms[1]", "a string"),
    ({"vms": ["vm-1", "vm-1"]}, "vms[1]", "listed twice"),
    ({"filter": {"name": "web*"}}, "vms", "not both"),
    ({"vms": None}, "vms", "either"),
    ({"name": "../x"}, "name", "letters, digits"),
    ({"limits": {"per_plan": 0}}, "limits.per_plan", "an integer >= 1"),
    ({"limits": {"per_host": "2"}}, "limits.per_host", "an integer"),
    ({"limits": {"per_vm": 1}}, "limits.per_vm", "unknown field"),
    ({"network_map": {"VM Network": {"network": "a", "bridge": "b"}}},
     "network_map.VM Network", "exactly one of"),
    ({"network_map": {"VM Network": "default"}}, "network_map.VM Network", "JSON object"),
    ({"network_map": {"VM Network": {"bridge": "no/such"}}}, "network_map.VM Network.bridge",
     "an interface name"),
    ({"storage_map": {}}, "storage_map", "at least one datastore"),
    ({"storage_map": {"LocalDS_0": {"directory": "/etc/hypersdk"}}},
     "storage_map.LocalDS_0.directory", "outside the paths.outputs roots"),
    ({"storage_map": {"LocalDS_0": {"directory": "relative"}}},
     "storage_map.LocalDS_0.directory", "not an absolute path"),
    ({"storage_map": {"LocalDS_0": {"directory": "/x/../etc"}}},
     "storage_map.LocalDS_0.directory", "'..'"),
    ({"storage_map": {"*": {"format": "vmdk"}}}, "storage_map.*.directory", "required"),
    ({"storage_map": {"*": {"directory": "/tmp", "target": "kvm2"}}}, "storage_map.*",
     "not both"),
    ({"storage_map": {"*": {"target": "kvm2"}}}, "storage_map.*.target",
     "unknown target 'kvm2'"),
    ({"storage_map": {"*": {"target": "remote", "format": "qcow2"}}},
     "storage_map.*.format", "target 'remote' takes raw volumes"),
    ({"verify_boot": {"wait": "5m"}}, "verify_boot.wait", "unknown field"),
    ({"guest_conversion": "yes"}, "guest_conversion", "true or false"),
])
def test_each_bad_field_is_named_with_its_rule(config, tmp_path, changes, field, rule):
    got_field, got_rule = refused(config, good(tmp_path, **changes))
    assert got_field == field
    assert rule in got_rule


def test_a_storage_target_is_normalised_with_its_format(config, tmp_path):
    plan = validate_plan(good(tmp_path, storage_map={"*": {"target": "remote"}}), config,
                         ProviderRegistry(config))
    assert plan["storage_map"] == {"*": {"target": "remote", "format": "raw"}}


def test_a_disk_format_other_than_qcow2_or_raw(config, tmp_path):
    storage = {"*": {"directory": str(tmp_path), "format": "vmdk"}}
    assert refused(config, good(tmp_path, storage_map=storage)) == (
        "storage_map.*.format", "one of qcow2, raw")


def test_not_an_object_and_an_unknown_provider(config, tmp_path):
    assert refused(config, ["a plan"]) == ("definition", "must be a JSON object")
    field, rule = refused(config, good(tmp_path, provider="nowhere"))
    assert field == "provider" and "unknown provider 'nowhere'" in rule
