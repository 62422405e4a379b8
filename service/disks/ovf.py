"""Read an OVF descriptor safely: the VM's name, CPUs, memory, firmware, disks, NICs.

The parser never resolves entities, loads DTDs or touches the network, and any
DOCTYPE is refused outright — an OVF has no business declaring entities, and an
entity-expansion bomb or an external entity (`SYSTEM "file:///etc/shadow"`) each get
their own message. Elements are matched by local name so OVF 1.x and 2.x (and
VMware's and VirtualBox's extensions) read the same way.
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lxml import etree

from ..errors import InvalidArgument

MAX_OVF_BYTES = 16 << 20

# CIM ResourceType values used in VirtualHardwareSection items.
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_ETHERNET, RT_CDROM, RT_DISK = 3, 4, 5, 6, 10, 15, 17
RT_OTHER_STORAGE = 20
_CONTROLLER_TYPES = {RT_IDE: "ide", RT_SCSI: "scsi", RT_OTHER_STORAGE: "sata"}
_LEGACY_UNITS = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10,
                 "megabytes": 1 << 20, "mb": 1 << 20, "gigabytes": 1 << 30, "gb": 1 << 30,
                 "terabytes": 1 << 40, "tb": 1 << 40}


@dataclass
class OvfDisk:
    disk_id: str
    file_href: str | None
    capacity_bytes: int
    populated_bytes: int | None
    format: str | None
    controller: str | None       # ide, scsi, sata, nvme
    controller_subtype: str | None  # lsilogic, pvscsi, vmware.sata.ahci, ...
    unit: int | None
    boot_order: int


@dataclass
class OvfNic:
    mac: str | None
    network: str | None
    model: str | None


@dataclass
class OvfInfo:
    name: str
    cpus: int
    memory_bytes: int
    firmware: str                # "bios" or "efi"
    os_type: str | None          # vmw:osType, or the OVF OS id's description
    os_id: int | None
    hw_version: str | None       # vssd:VirtualSystemType, e.g. "vmx-13"
    disks: list[OvfDisk] = field(default_factory=list)
    nics: list[OvfNic] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)

    @property
    def memory_mb(self) -> int:
        return self.memory_bytes // (1 << 20)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory_mb"] = self.memory_mb
        return data


def parse_units(text: str | None, where: str) -> int:
    """Bytes per unit for a DMTF programmatic unit ("byte * 2^20") or a legacy name."""
    if not text:
        return 1
    compact = text.strip().lower()
    if compact in _LEGACY_UNITS:
        return _LEGACY_UNITS[compact]
    parts = [p.strip() for p in compact.split("*")]
    if parts[0] != "byte":
        raise InvalidArgument(where, f"allocation unit {text!r} is not bytes")
    factor = 1
    for part in parts[1:]:
        match = re.fullmatch(r"(\d+)(?:\s*\^\s*(\d+))?", part)
        if not match:
            raise InvalidArgument(where, f"allocation unit {text!r} is not of the form "
                                         f"'byte * B^E'")
        base, exp = int(match.group(1)), int(match.group(2) or 1)
        if exp > 64:
            raise InvalidArgument(where, f"allocation unit {text!r} is out of range")
        factor *= base ** exp
    return factor


def _local(tag) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _attr(el, name: str) -> str | None:
    """An attribute by local name, whatever its namespace (ovf:, vmw:, none)."""
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(el, name: str) -> list:
    return [c for c in el if _local(c.tag) == name]


def _child_text(el, name: str) -> str | None:
    for child in el:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _find_all(el, name: str) -> list:
    return list(el.iter(f"{{*}}{name}", name))


def _refuse_doctype(path: Path, tree) -> None:
    dtd = tree.docinfo.internalDTD
    if dtd is None and not tree.docinfo.doctype:
        return
    for entity in (dtd.iterentities() if dtd is not None else []):
        if entity.system_url:
            raise InvalidArgument(str(path), f"external entity {entity.name!r} "
                                             f"(SYSTEM {entity.system_url!r}) refused: an OVF "
                                             f"may not pull in other files")
    for entity in (dtd.iterentities() if dtd is not None else []):
        if "&" in (entity.content or ""):
            raise InvalidArgument(str(path), f"entity {entity.name!r} expands other entities "
                                             f"(an entity-expansion bomb): refused")
    raise InvalidArgument(str(path), "DOCTYPE and entity declarations are refused in an OVF")


def load_ovf_tree(path: Path):
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(str(path), "no such file")
    if path.stat().st_size > MAX_OVF_BYTES:
        raise InvalidArgument(str(path), f"an OVF descriptor larger than {MAX_OVF_BYTES} bytes "
                                         f"is refused")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False, remove_comments=True)
    try:  # from bytes: lxml reports bad encodings from files as OSError, from bytes as syntax
        tree = etree.parse(io.BytesIO(path.read_bytes()), parser)
    except etree.XMLSyntaxError as exc:
        raise InvalidArgument(str(path), f"not well-formed XML: {exc}") from None
    _refuse_doctype(path, tree)
    if _local(tree.getroot().tag) != "Envelope":
        raise InvalidArgument(str(path), "not an OVF: the root element is not Envelope")
    return tree


def _int(text: str | None, where: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(where, f"{text!r} is not an integer") from None


def _disk_section(path: Path, root) -> dict[str, dict]:
    files = {_attr(f, "id"): _attr(f, "href") for f in _find_all(root, "File")}
    disks: dict[str, dict] = {}
    for disk in _find_all(root, "Disk"):
        disk_id = _attr(disk, "diskId")
        where = f"{path.name}: Disk {disk_id}"
        capacity = _int(_attr(disk, "capacity"), where)
        if not disk_id or capacity is None:
            raise InvalidArgument(where, "a Disk needs ovf:diskId and ovf:capacity")
        if capacity <= 0:
            raise InvalidArgument(where, f"capacity {capacity} is not positive")
        unit = parse_units(_attr(disk, "capacityAllocationUnits"), where)
        file_ref = _attr(disk, "fileRef")
        if file_ref and file_ref not in files:
            raise InvalidArgument(where, f"fileRef {file_ref!r} is not in References")
        disks[disk_id] = {"capacity_bytes": capacity * unit, "file_href": files.get(file_ref),
                          "populated_bytes": _int(_attr(disk, "populatedSize"), where),
                          "format": _attr(disk, "format")}
    return disks


def _firmware(system, hardware) -> str:
    """"efi" or "bios": VMware's `vmw:Config key="firmware"`, else a `firmware`
    attribute or element anywhere in the VirtualSystem (VirtualBox writes
    `<Firmware type="EFI"/>`)."""
    values = [_attr(c, "value") for c in _children(hardware, "Config")
              if _attr(c, "key") == "firmware"]
    values.append(_attr(hardware, "firmware"))
    values += [(el.text or "").strip() or _attr(el, "type") or _attr(el, "value")
               for el in system.iter() if _local(el.tag).lower() == "firmware"]
    value = next((v for v in values if v), "")
    return "efi" if value.strip().lower() in ("efi", "efi64", "uefi") else "bios"


def _controller(item) -> tuple[str | None, str | None]:
    rtype = _int(_child_text(item, "ResourceType"), "ResourceType")
    subtype = _child_text(item, "ResourceSubType")
    if subtype and "nvme" in subtype.lower():
        return "nvme", subtype
    return _CONTROLLER_TYPES.get(rtype), subtype


def parse_ovf(path: Path) -> OvfInfo:
    """Parse an OVF descriptor (the first VirtualSystem) into an OvfInfo."""
    path = Path(path)
    root = load_ovf_tree(path).getroot()
    systems = _find_all(root, "VirtualSystem")
    if not systems:
        raise InvalidArgument(str(path), "no VirtualSystem in the OVF")
    system = systems[0]
    hardware_sections = _children(system, "VirtualHardwareSection")
    if not hardware_sections:
        raise InvalidArgument(str(path), "the VirtualSystem has no VirtualHardwareSection")
    hardware = hardware_sections[0]
    disk_defs = _disk_section(path, root)
    name = _child_text(system, "Name") or _attr(system, "id") or path.stem
    cpus, memory = 1, 0
    controllers: dict[str, tuple[str | None, str | None]] = {}
    disk_items, nics = [], []
    items = [i for i in hardware if _local(i.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    for item in items:
        where = f"{path.name}: Item {_child_text(item, 'InstanceID')}"
        rtype = _int(_child_text(item, "ResourceType"), where)
        quantity = _int(_child_text(item, "VirtualQuantity"), where)
        if rtype == RT_CPU:
            cpus = 1 if quantity is None else quantity
            if cpus < 1:
                raise InvalidArgument(where, f"{cpus} virtual CPUs: needs at least 1")
        elif rtype == RT_MEMORY:
            memory = (quantity or 0) * parse_units(_child_text(item, "AllocationUnits"), where)
        elif rtype in (RT_IDE, RT_SCSI, RT_OTHER_STORAGE):
            controllers[_child_text(item, "InstanceID") or ""] = _controller(item)
        elif rtype == RT_DISK:
            disk_items.append(item)
        elif rtype == RT_ETHERNET:
            nics.append(OvfNic(mac=_child_text(item, "Address") or None,
                               network=_child_text(item, "Connection") or None,
                               model=_child_text(item, "ResourceSubType") or None))
    if memory <= 0:
        raise InvalidArgument(str(path), "the OVF gives the VM no memory (ResourceType 4)")
    disks = _disks(path, disk_items, disk_defs, controllers)
    os_section = (_children(system, "OperatingSystemSection") or [None])[0]
    os_type = os_id = None
    if os_section is not None:
        os_type = _attr(os_section, "osType") or _child_text(os_section, "Description")
        os_id = _int(_attr(os_section, "id"), f"{path.name}: OperatingSystemSection")
    system_el = (_children(hardware, "System") or [None])[0]
    hw_version = _child_text(system_el, "VirtualSystemType") if system_el is not None else None
    networks = [_attr(n, "name") for n in _find_all(root, "Network") if _attr(n, "name")]
    return OvfInfo(name=name, cpus=cpus, memory_bytes=memory, firmware=_firmware(system, hardware),
                   os_type=os_type, os_id=os_id, hw_version=hw_version, disks=disks, nics=nics,
                   networks=networks)


def _disks(path: Path, items: list, defs: dict[str, dict],
           controllers: dict[str, tuple[str | None, str | None]]) -> list[OvfDisk]:
    """Disks in boot order: controller order in the OVF, then unit number."""
    order = list(controllers)
    found = []
    for item in items:
        resource = _child_text(item, "HostResource") or ""
        disk_id = resource.rsplit("/", 1)[-1]
        if disk_id not in defs:
            raise InvalidArgument(f"{path.name}: Item {_child_text(item, 'InstanceID')}",
                                  f"HostResource {resource!r} names no Disk in DiskSection")
        parent = _child_text(item, "Parent") or ""
        unit = _int(_child_text(item, "AddressOnParent"), "AddressOnParent")
        rank = order.index(parent) if parent in order else len(order)
        found.append((rank, unit if unit is not None else 0, disk_id, parent, unit))
    found.sort(key=lambda t: (t[0], t[1]))
    disks = []
    for boot, (_rank, _u, disk_id, parent, unit) in enumerate(found, 1):
        kind, subtype = controllers.get(parent, (None, None))
        disks.append(OvfDisk(disk_id=disk_id, controller=kind, controller_subtype=subtype,
                             unit=unit, boot_order=boot, **defs[disk_id]))
    return disks
