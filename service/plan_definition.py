"""What a migration plan is: its definition, read strictly (unknown fields refused).

A plan is a named set of VMs of ONE provider, by `vms` (identifiers) or by the
discovery `filter` (the provider's ListVMs filter), with
- `network_map`: source network / port group -> `{"network": <libvirt network>}` or
  `{"bridge": <host bridge>}`; every NIC of every VM must be mapped (MACs are kept);
- `storage_map`: source datastore -> `{"directory": <under paths.outputs>, "format":
  qcow2 | raw}` or `{"target": <one of the config's targets>}` (the disks are uploaded
  into its pool in its format, the domain defined there); `"*"` maps every datastore
  not named. A VM lands (in `<directory>/<vm name>/`, or the target) where its first
  disk's datastore is mapped;
- `limits`: VMs at once for the whole plan (`per_plan`, default 2), per source host
  (`per_host`) and per datastore (`per_datastore`), on top of the engine's workers;
- `verify_boot` and `guest_conversion`, passed to each VM's export job as they are;
- `warm` with `precopy_interval` and `cutover_at` (as in an export job: jobs/warm.py):
  each VM's export is a warm one. A provider that cannot do warm migration makes the
  plan migrate cold, saying why in `warm_fallback` (shown in the report's warnings).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .confine import split_under
from .definitions import JsonObject, check_name
from .errors import InvalidArgument
from .jobs.warm import check_definition as check_warm
from .kvm.targets import check_format, find_target
from .kvm.boot_verify import parse_verify_boot

if TYPE_CHECKING:
    from .config import Config
    from .providers.registry import ProviderRegistry

PLAN_FIELDS = ("name", "provider", "vms", "filter", "network_map", "storage_map", "limits",
               "verify_boot", "guest_conversion", "description", "warm", "precopy_interval",
               "cutover_at")
LIMIT_FIELDS = ("per_plan", "per_host", "per_datastore")
DEFAULT_PER_PLAN = 2
ANY_DATASTORE = "*"
NIC_TARGETS = ("network", "bridge")
DISK_FORMATS = ("qcow2", "raw")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")  # an interface name (IFNAMSIZ)


def parse_network_map(value: Any, field: str) -> dict[str, dict[str, str]]:
    """{source network: {"network": name} | {"bridge": name}}, each with exactly one key."""
    mapping = JsonObject({field: value}, (field,)).mapping(field, {})
    result = {}
    for source, target in mapping.items():
        prefix = f"{field}.{source}."
        fields = JsonObject(target, NIC_TARGETS, prefix)
        given = [key for key in NIC_TARGETS if fields.data.get(key) is not None]
        if len(given) != 1:
            raise InvalidArgument(prefix.rstrip("."), 'exactly one of "network" (a libvirt '
                                  'network) or "bridge" (a host bridge)')
        kind = given[0]
        name = fields.text(kind, non_empty=True)
        if kind == "bridge" and not _BRIDGE_RE.match(name):
            raise InvalidArgument(prefix + kind, "an interface name: 1-15 letters, digits, "
                                  "'_', '.', ':' or '-'")
        result[source] = {kind: name}
    return result


def parse_output_dir(value: Any, field: str, config: "Config") -> str:
    """A directory under paths.outputs (absolute; `..` refused), as given."""
    root, relative = split_under(value, config.paths.outputs, field, "paths.outputs")
    return str(root / relative) if relative else str(root)


def _storage_map(fields: JsonObject, config: "Config") -> dict[str, dict[str, str]]:
    mapping = fields.mapping("storage_map")
    if not mapping:
        raise InvalidArgument("storage_map", "at least one datastore (or \"*\")")
    result = {}
    for source, target in mapping.items():
        result[source] = _storage_entry(target, f"storage_map.{source}.", config)
    return result


def _storage_entry(value: Any, prefix: str, config: "Config") -> dict[str, str]:
    """{"directory", "format"} or {"target", "format"}: exactly one of the two places."""
    entry = JsonObject(value, ("directory", "target", "format"), prefix)
    if entry.data.get("directory") is not None and entry.data.get("target") is not None:
        raise InvalidArgument(prefix.rstrip("."), 'either "directory" (under paths.outputs) '
                              'or "target" (one of the config\'s targets), not both')
    if entry.data.get("target") is not None:
        target = find_target(config, entry.data["target"], prefix + "target")
        return {"target": target.name,
                "format": check_format(target, entry.text("format", ""), prefix + "format")}
    return {"directory": parse_output_dir(entry.text("directory"), prefix + "directory", config),
            "format": entry.text("format", config.hyper2kvm.default_format,
                                 choices=DISK_FORMATS)}


def _limits(fields: JsonObject) -> dict[str, int | None]:
    section = fields.section("limits", LIMIT_FIELDS)
    return {"per_plan": section.integer("per_plan", DEFAULT_PER_PLAN, minimum=1),
            "per_host": section.integer("per_host", None, minimum=1),
            "per_datastore": section.integer("per_datastore", None, minimum=1)}


def _warm(fields: JsonObject, provider_reason: str | None) -> dict:
    """The warm settings of an export job; cold (with `warm_fallback` saying why) when the
    provider cannot do warm migration."""
    warm = check_warm(fields, None)
    if warm["warm"] and provider_reason is not None:
        return {"warm": False, "warm_fallback": f"{provider_reason}; the VMs migrate cold"}
    return {**warm, "warm_fallback": ""}


def validate_plan(definition: Any, config: "Config", providers: "ProviderRegistry") -> dict:
    """The normalised plan definition, or InvalidArgument naming the field and the rule."""
    fields = JsonObject(definition, PLAN_FIELDS)
    name = check_name(fields.text("name"))
    provider = fields.text("provider", non_empty=True)
    providers.check_usable(provider)
    vms = fields.texts("vms", None, non_empty=True)
    vm_filter = fields.mapping("filter", None)
    if (vms is None) == (vm_filter is None):
        raise InvalidArgument("vms", 'give the VMs either as "vms" (a list of identifiers) '
                                     'or as "filter" (a discovery filter), not both')
    if vms is not None:
        for index, vm in enumerate(vms):
            if not vm.strip():
                raise InvalidArgument(f"vms[{index}]", "a non-empty VM identifier")
            if vm in vms[:index]:
                raise InvalidArgument(f"vms[{index}]", f"{vm!r} is listed twice")
    parse_verify_boot(definition.get("verify_boot"), "verify_boot")  # passed on as given
    return {**_warm(fields, providers.warm_unsupported(provider)), "name": name, "provider": provider, "vms": vms, "filter": vm_filter,
            "network_map": parse_network_map(definition.get("network_map"), "network_map"),
            "storage_map": _storage_map(fields, config), "limits": _limits(fields),
            "verify_boot": definition.get("verify_boot") or False,
            "guest_conversion": fields.flag("guest_conversion", False),
            "description": fields.text("description", "")}
