"""OVF 1.x descriptors, SHA-256 manifests and OVA archives for exported VMs.

`build_ovf` turns a VMInfo and its exported disks into an OVF envelope (CPU,
memory, firmware, controllers, disks with capacities, NICs; CD-ROM drives only
when they are kept). `write_manifest` writes the `.mf` (`SHA256(name)= hex` per
file). `write_ova` streams the descriptor, the manifest and the disks into a tar
with the descriptor first, as the OVF specification requires. Every file is
written under a temporary name, fsynced and renamed into place.
"""
from __future__ import annotations

import re
import struct
import tarfile
import threading
from pathlib import Path
from typing import IO, Callable

from lxml import etree

from ..errors import Cancelled, Failed
from ..model import ExportedDisk, VMInfo
from .vmdk import MAX_DESCRIPTOR_BYTES, SECTOR

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
NSMAP = {None: OVF, "ovf": OVF, "rasd": RASD, "vssd": VSSD, "vmw": VMW, "xsi": XSI}
VMDK_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#"
COPY_BUFFER = 4 << 20

# rasd:ResourceType values (CIM_ResourceAllocationSettingData)
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC, RT_CDROM, RT_DISK, RT_OTHER = 3, 4, 5, 6, 10, 15, 17, 20
CONTROLLER_TYPES = {"scsi": RT_SCSI, "ide": RT_IDE, "sata": RT_OTHER, "nvme": RT_OTHER}
SCSI_SUBTYPES = {"ParaVirtualSCSIController": "VirtualSCSI",
                 "VirtualLsiLogicController": "lsilogic",
                 "VirtualLsiLogicSASController": "lsilogicsas",
                 "VirtualBusLogicController": "buslogic"}
OTHER_SUBTYPES = {"sata": "vmware.sata.ahci", "nvme": "vmware.nvme.controller"}
DEFAULT_CONTROLLER = {"key": -1, "type": "scsi", "model": "VirtualLsiLogicController", "bus": 0}
NIC_SUBTYPES = {"vmxnet3": "VmxNet3", "e1000": "E1000", "e1000e": "E1000e", "pcnet32": "PCNet32"}


def safe_name(name: str, limit: int | None = None) -> str:
    """A stem safe in file and object names: runs of other characters become one "_",
    no leading or trailing "." or "_", at most `limit` characters; "vm" when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:limit] or "vm"


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def vmdk_create_type(path: Path) -> str:
    """A VMDK's createType from its (embedded) descriptor, reading only the first sectors.

    Exported disks are renamed, so the extent names inside their descriptors no
    longer match; only the createType matters for the OVF format URI.
    """
    with open(path, "rb") as handle:
        head = handle.read(SECTOR)
        if head[:4] == b"KDMV":
            offset, size = struct.unpack_from("<QQ", head, 28)
            handle.seek(offset * SECTOR)
            text = handle.read(min(size * SECTOR, MAX_DESCRIPTOR_BYTES))
        else:
            text = head + handle.read(MAX_DESCRIPTOR_BYTES - SECTOR)
    match = re.search(rb'createType\s*=\s*"([A-Za-z0-9]+)"', text)
    if not match:
        raise Failed(f"{path}: not a VMDK (no createType in its descriptor)")
    return match.group(1).decode()


def vmdk_format_uri(path: Path) -> str:
    """The OVF disk format URI of a VMDK (streamOptimized, sparse, ...)."""
    create_type = vmdk_create_type(path)
    return VMDK_FORMAT + ("sparse" if create_type == "monolithicSparse" else create_type)


class _Hardware:
    """Builds the Items of a VirtualHardwareSection with increasing InstanceIDs."""

    def __init__(self, section: etree._Element) -> None:
        self.section = section
        self.next_id = 1

    def item(self, resource_type: int, name: str, **values) -> str:
        instance_id = str(self.next_id)
        self.next_id += 1
        item = etree.SubElement(self.section, _q(OVF, "Item"))
        fields = {"ElementName": name, "InstanceID": instance_id,
                  "ResourceType": str(resource_type), **values}
        for key in sorted(fields):  # rasd elements are in alphabetical order in the schema
            if fields[key] is not None:
                etree.SubElement(item, _q(RASD, key)).text = str(fields[key])
        return instance_id


def _text(parent, ns: str, tag: str, text: str, **attrs) -> etree._Element:
    element = etree.SubElement(parent, _q(ns, tag), {_q(OVF, k): v for k, v in attrs.items()})
    element.text = text
    return element


def _references(envelope, vm: VMInfo, disks: list[ExportedDisk]) -> None:
    refs = etree.SubElement(envelope, _q(OVF, "References"))
    for index, disk in enumerate(disks):
        etree.SubElement(refs, _q(OVF, "File"), {_q(OVF, "id"): f"file{index + 1}",
                                                _q(OVF, "href"): disk.path.name,
                                                _q(OVF, "size"): str(disk.file_bytes)})
    section = etree.SubElement(envelope, _q(OVF, "DiskSection"))
    _text(section, OVF, "Info", "Virtual disk information")
    for index, disk in enumerate(disks):
        etree.SubElement(section, _q(OVF, "Disk"), {
            _q(OVF, "diskId"): f"vmdisk{index + 1}", _q(OVF, "fileRef"): f"file{index + 1}",
            _q(OVF, "capacity"): str(disk.capacity_bytes),
            _q(OVF, "capacityAllocationUnits"): "byte",
            _q(OVF, "format"): vmdk_format_uri(disk.path)})
    networks = etree.SubElement(envelope, _q(OVF, "NetworkSection"))
    _text(networks, OVF, "Info", "The list of logical networks")
    for name in dict.fromkeys(nic.network for nic in vm.nics):
        network = etree.SubElement(networks, _q(OVF, "Network"), {_q(OVF, "name"): name})
        _text(network, OVF, "Description", f"The {name} network")


def _controllers(hw: _Hardware, vm: VMInfo, wanted: set[str]) -> dict[int, str]:
    """Controller items for the controller types in use; returns controller key -> InstanceID."""
    known = vm.extra.get("controllers")
    if not known:  # providers without controller details: one SCSI controller for all disks
        known, wanted = [DEFAULT_CONTROLLER], {"scsi"}
    ids = {}
    for ctl in known:
        if ctl["type"] not in wanted:
            continue
        subtype = (SCSI_SUBTYPES.get(ctl["model"], "lsilogic") if ctl["type"] == "scsi"
                   else OTHER_SUBTYPES.get(ctl["type"]))
        ids[ctl["key"]] = hw.item(CONTROLLER_TYPES[ctl["type"]],
                                  f"{ctl['type'].upper()} controller {ctl['bus']}",
                                  Address=str(ctl["bus"]), ResourceSubType=subtype)
    return ids


def _disk_items(hw: _Hardware, vm: VMInfo, disks: list[ExportedDisk],
                controller_ids: dict[int, str]) -> None:
    slots = vm.extra.get("disk_slots", {})
    fallback = next(iter(controller_ids.values()), None)
    for index, disk in enumerate(disks):
        slot = slots.get(disk.key, {})
        hw.item(RT_DISK, disk.label or f"Hard disk {index + 1}",
                AddressOnParent=str(slot.get("unit", index)),
                HostResource=f"ovf:/disk/vmdisk{index + 1}",
                Parent=controller_ids.get(slot.get("controller_key"), fallback))


def build_ovf(vm: VMInfo, disks: list[ExportedDisk], *, remove_cdrom: bool) -> bytes:
    """The OVF descriptor (UTF-8 XML bytes) for `vm` with the exported `disks`."""
    envelope = etree.Element(_q(OVF, "Envelope"), nsmap=NSMAP)
    _references(envelope, vm, disks)
    system = etree.SubElement(envelope, _q(OVF, "VirtualSystem"), {_q(OVF, "id"): vm.name})
    _text(system, OVF, "Info", "A virtual machine")
    _text(system, OVF, "Name", vm.name)
    os_section = etree.SubElement(system, _q(OVF, "OperatingSystemSection"),
                                  {_q(OVF, "id"): "1", _q(VMW, "osType"): vm.extra.get("guest_id")
                                   or "otherGuest"})
    _text(os_section, OVF, "Info", "The guest operating system")
    _text(os_section, OVF, "Description", vm.guest_os or "unknown")
    section = etree.SubElement(system, _q(OVF, "VirtualHardwareSection"))
    _text(section, OVF, "Info", "Virtual hardware requirements")
    vssd = etree.SubElement(section, _q(OVF, "System"))
    for key, value in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                       ("VirtualSystemIdentifier", vm.name), ("VirtualSystemType", "vmx-13")):
        etree.SubElement(vssd, _q(VSSD, key)).text = value
    hw = _Hardware(section)
    hw.item(RT_CPU, f"{vm.cpus} virtual CPU(s)", AllocationUnits="hertz * 10^6",
            VirtualQuantity=str(vm.cpus))
    hw.item(RT_MEMORY, f"{vm.memory_mb} MB of memory", AllocationUnits="byte * 2^20",
            VirtualQuantity=str(vm.memory_mb))
    in_use = {d.controller for d in vm.disks if d.controller}
    keep_cdrom = not remove_cdrom and vm.extra.get("cdroms", 0) > 0
    controller_ids = _controllers(hw, vm, in_use | ({"ide"} if keep_cdrom else set()))
    _disk_items(hw, vm, disks, controller_ids)
    if keep_cdrom:
        ide = next((i for k, i in controller_ids.items()), None)
        for number in range(vm.extra["cdroms"]):
            hw.item(RT_CDROM, f"CD/DVD drive {number + 1}", AddressOnParent=str(number),
                    AutomaticAllocation="false", Parent=ide)
    for index, nic in enumerate(vm.nics):
        hw.item(RT_NIC, f"Network adapter {index + 1}", Address=nic.mac or None,
                AddressOnParent=str(7 + index), AutomaticAllocation="true",
                Connection=nic.network, ResourceSubType=NIC_SUBTYPES.get(nic.adapter))
    etree.SubElement(section, _q(VMW, "Config"), {
        _q(OVF, "required"): "false", _q(VMW, "key"): "firmware",
        _q(VMW, "value"): "efi" if vm.firmware == "uefi" else "bios"})
    if vm.secure_boot:
        etree.SubElement(section, _q(VMW, "Config"), {
            _q(OVF, "required"): "false", _q(VMW, "key"): "bootOptions.efiSecureBootEnabled",
            _q(VMW, "value"): "true"})
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def manifest_text(digests: dict[str, str]) -> bytes:
    """`.mf` content: one `SHA256(name)= hex` line per file, in the given order."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in digests.items()).encode()


class _CountingReader:
    """A file wrapper that reports how many bytes were read (for progress while packaging)
    and stops the packaging at the next read once `stop` is set (a cancelled job)."""

    def __init__(self, handle: IO[bytes], on_bytes: Callable[[int], None],
                 stop: threading.Event) -> None:
        self._handle = handle
        self._on_bytes = on_bytes
        self._stop = stop

    def read(self, size: int = -1) -> bytes:
        if self._stop.is_set():
            raise Cancelled("packaging the OVA cancelled")
        data = self._handle.read(size)
        self._on_bytes(len(data))
        return data


def write_ova(target: Path, members: list[Path], on_bytes: Callable[[int], None],
              stop: threading.Event) -> None:
    """Stream `members` (the .ovf first) into a new tar at `target`, a name in the job's
    staging directory (blocking; the caller lands it). Setting `stop` ends it within one
    copy buffer, the partial tar removed.

    PAX format: plain ustar headers, plus an extended header only for a member
    larger than ustar's 8 GiB limit.
    """
    if not members or members[0].suffix != ".ovf":
        raise ValueError("the OVF descriptor must be the first member of an OVA")
    try:
        with tarfile.open(target, "x", format=tarfile.PAX_FORMAT,
                          copybufsize=COPY_BUFFER) as tar:
            for member in members:
                info = tar.gettarinfo(str(member), arcname=member.name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = 0o644
                with open(member, "rb") as handle:
                    tar.addfile(info, _CountingReader(handle, on_bytes, stop))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
