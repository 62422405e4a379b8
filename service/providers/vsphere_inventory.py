"""The whole vSphere inventory in one PropertyCollector round trip, as VMInfo records.

`fetch_inventory(si, provider)` (blocking; run it in a thread) creates a recursive
ContainerView of VMs, folders, datacenters, vApps/resource pools and networks, asks
the PropertyCollector for just the properties we need of all of them (plus the
custom field names) in one RetrievePropertiesEx call (continued only when the
server pages the result), and builds each VM's inventory path from the parents.
`filter_vms` applies a validated ListVMs filter.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from pyVmomi import vim, vmodl

from ..errors import InvalidArgument
from ..model import DiskInfo, NicInfo, VMInfo

POWER_STATES = ("poweredOn", "poweredOff", "suspended")
FILTER_KEYS = ("datacenter", "status", "power_state", "folder", "name", "tags")

VM_PROPERTIES = [
    "name", "parent", "resourcePool", "config.instanceUuid", "config.guestFullName",
    "config.guestId", "config.hardware.numCPU", "config.hardware.memoryMB", "config.firmware",
    "config.bootOptions", "config.hardware.device", "config.template", "runtime.powerState",
    "runtime.host", "customValue",
]
CONTAINER_TYPES = [vim.VirtualMachine, vim.Folder, vim.Datacenter, vim.Network,
                   vim.ResourcePool, vim.HostSystem]
CONTROLLER_KINDS = (
    (vim.vm.device.VirtualSCSIController, "scsi"),
    (vim.vm.device.VirtualAHCIController, "sata"),
    (vim.vm.device.VirtualIDEController, "ide"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
)
NIC_ADAPTERS = (
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualPCNet32, "pcnet32"),
)


@dataclass
class _Node:
    name: str
    parent: str | None
    kind: str


def _spec(content) -> tuple[vmodl.query.PropertyCollector.FilterSpec, object]:
    view = content.viewManager.CreateContainerView(content.rootFolder, CONTAINER_TYPES, True)
    traverse = vmodl.query.PropertyCollector.TraversalSpec(
        name="view", path="view", skip=False, type=vim.view.ContainerView)
    objects = [vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traverse]),
               vmodl.query.PropertyCollector.ObjectSpec(obj=content.customFieldsManager)]
    props = [
        vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=VM_PROPERTIES),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.Folder, pathSet=["name", "parent"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.Datacenter, pathSet=["name", "parent"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.ResourcePool,
                                                   pathSet=["name", "parent"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.Network, pathSet=["name"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.HostSystem, pathSet=["name"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.dvs.DistributedVirtualPortgroup,
                                                   pathSet=["name", "key"]),
        vmodl.query.PropertyCollector.PropertySpec(type=vim.CustomFieldsManager,
                                                   pathSet=["field"]),
    ]
    return vmodl.query.PropertyCollector.FilterSpec(objectSet=objects, propSet=props), view


def _retrieve(content) -> list:
    spec, view = _spec(content)
    collector = content.propertyCollector
    try:
        options = vmodl.query.PropertyCollector.RetrieveOptions()
        result = collector.RetrievePropertiesEx([spec], options)
        objects = list(result.objects) if result else []
        while result and result.token:
            result = collector.ContinueRetrievePropertiesEx(result.token)
            objects.extend(result.objects)
        return objects
    finally:
        view.Destroy()


def fetch_inventory(si, provider: str) -> list[VMInfo]:
    """Every VM of the endpoint (blocking)."""
    objects = _retrieve(si.RetrieveContent())
    nodes: dict[str, _Node] = {}
    networks: dict[str, str] = {}   # DVPG key or network moref -> name
    hosts: dict[str, str] = {}      # host moref -> name
    fields: dict[int, str] = {}
    vms = []
    for obj in objects:
        props = {p.name: p.val for p in obj.propSet}
        ref = obj.obj
        if isinstance(ref, vim.CustomFieldsManager):
            fields = {f.key: f.name for f in props.get("field", [])}
        elif isinstance(ref, vim.VirtualMachine):
            vms.append((ref, props))
        elif isinstance(ref, vim.Network):
            networks[props.get("key") or ref._moId] = props.get("name", "")
        elif isinstance(ref, vim.HostSystem):
            hosts[ref._moId] = props.get("name", "")
        else:
            parent = props.get("parent")
            nodes[ref._moId] = _Node(props.get("name", ""), parent._moId if parent else None,
                                     type(ref).__name__)
    return [_vm_info(ref, props, nodes, networks, fields, provider, hosts) for ref, props in vms]


def _path_and_datacenter(parent_id: str | None, nodes: dict[str, _Node]) -> tuple[list[str], str]:
    parts, datacenter = [], ""
    while parent_id in nodes:
        node = nodes[parent_id]
        if node.parent is None:  # the root folder is not part of paths
            break
        parts.append(node.name)
        if node.kind == "vim.Datacenter":
            datacenter = node.name
        parent_id = node.parent
    return list(reversed(parts)), datacenter


def _vm_info(ref, props: dict, nodes: dict[str, _Node], networks: dict[str, str],
             fields: dict[int, str], provider: str, hosts: dict[str, str]) -> VMInfo:
    host = props.get("runtime.host")
    parent = props.get("parent") or props.get("resourcePool")
    parts, datacenter = _path_and_datacenter(parent._moId if parent else None, nodes)
    devices = props.get("config.hardware.device", [])
    boot = props.get("config.bootOptions")
    controllers = _controllers(devices)
    disks, slots = _disks(devices, controllers)
    return VMInfo(
        identifier=ref._moId, name=props.get("name", ""), provider=provider,
        power_state=str(props.get("runtime.powerState", "unknown")),
        path="/".join([*parts, props.get("name", "")]),
        uuid=props.get("config.instanceUuid") or "",
        guest_os=props.get("config.guestFullName") or props.get("config.guestId") or "",
        cpus=int(props.get("config.hardware.numCPU") or 1),
        memory_mb=int(props.get("config.hardware.memoryMB") or 0),
        firmware="uefi" if props.get("config.firmware") == "efi" else "bios",
        secure_boot=bool(boot and getattr(boot, "efiSecureBootEnabled", False)),
        datacenter=datacenter,
        tags=[f"{fields.get(v.key, v.key)}={v.value}" for v in props.get("customValue", [])],
        disks=disks,
        nics=_nics(devices, networks),
        extra={"guest_id": props.get("config.guestId") or "",
               "host": hosts.get(host._moId, "") if host is not None else "",
               "template": bool(props.get("config.template")),
               "controllers": list(controllers.values()), "disk_slots": slots,
               "cdroms": sum(isinstance(d, vim.vm.device.VirtualCdrom) for d in devices)},
    )


def _controllers(devices) -> dict[int, dict]:
    found = {}
    for device in devices:
        for cls, kind in CONTROLLER_KINDS:
            if isinstance(device, cls):
                found[device.key] = {"key": device.key, "type": kind,
                                     "model": type(device).__name__.split(".")[-1],
                                     "bus": device.busNumber}
    return found


def _disks(devices, controllers: dict[int, dict]) -> tuple[list[DiskInfo], dict[str, dict]]:
    disks, slots = [], {}
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        key = f"disk-{device.key}"
        controller = controllers.get(device.controllerKey, {})
        capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
        disks.append(DiskInfo(key=key, label=device.deviceInfo.label if device.deviceInfo else key,
                              capacity_bytes=int(capacity),
                              location=getattr(device.backing, "fileName", "") or "",
                              controller=controller.get("type", "")))
        slots[key] = {"controller_key": device.controllerKey, "unit": device.unitNumber}
    return disks, slots


def _nics(devices, networks: dict[str, str]) -> list[NicInfo]:
    nics = []
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualEthernetCard):
            continue
        backing = device.backing
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            network = networks.get(backing.port.portgroupKey, backing.port.portgroupKey)
        else:
            network = getattr(backing, "deviceName", "") or ""
        adapter = next((name for cls, name in NIC_ADAPTERS if isinstance(device, cls)), "")
        nics.append(NicInfo(key=f"nic-{device.key}", mac=device.macAddress or "",
                            network=network, adapter=adapter))
    return nics


def check_filter(vm_filter: dict | None) -> dict:
    """The normalised filter, or InvalidArgument naming `filter.<key>` and the rule."""
    if vm_filter is None:
        return {}
    if not isinstance(vm_filter, dict):
        raise InvalidArgument("filter", "a mapping of " + ", ".join(FILTER_KEYS))
    result = {}
    for key, value in vm_filter.items():
        if key not in FILTER_KEYS:
            raise InvalidArgument(f"filter.{key}",
                                  "an unknown key; known: " + ", ".join(FILTER_KEYS))
        if key in ("status", "power_state"):
            if value not in POWER_STATES:
                raise InvalidArgument(f"filter.{key}", "one of " + ", ".join(POWER_STATES))
            result["power_state"] = value
        elif key == "tags":
            tags = [value] if isinstance(value, str) else value
            if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
                raise InvalidArgument("filter.tags", "a tag or a list of tags (name=value or name)")
            result["tags"] = tags
        else:
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"filter.{key}", "a non-empty string")
            result[key] = value.strip("/") if key == "folder" else value
    return result


def _has_tag(vm: VMInfo, wanted: str) -> bool:
    return any(tag == wanted or tag.split("=", 1)[0] == wanted for tag in vm.tags)


def filter_vms(vms: list[VMInfo], checked: dict) -> list[VMInfo]:
    """VMs matching every key of a filter returned by check_filter."""
    def keep(vm: VMInfo) -> bool:
        if "datacenter" in checked and vm.datacenter != checked["datacenter"]:
            return False
        if "power_state" in checked and vm.power_state != checked["power_state"]:
            return False
        if "folder" in checked and not vm.path.startswith(checked["folder"] + "/"):
            return False
        if "name" in checked and not fnmatch.fnmatchcase(vm.name, checked["name"]):
            return False
        return all(_has_tag(vm, tag) for tag in checked.get("tags", ()))
    return [vm for vm in vms if keep(vm)]
