"""The libvirt domain XML for an imported VM, built with lxml from the VM's facts.

Choices that decide whether the guest boots:
- Disks attach in boot order with per-device `<boot order>`. Linux guests get
  virtio (their kernels ship the drivers); Windows and unknown guests get SATA,
  which every OS can boot from without extra drivers (a note says so, because
  virtio is faster once the drivers are installed).
- NICs: virtio for Linux, e1000e otherwise, on a libvirt network or a host bridge,
  keeping the MAC.
- UEFI uses the OVMF builds from Debian's `ovmf` package: the loader is read-only
  pflash and libvirt copies the NVRAM template per domain. Secure boot needs the
  secboot loader, the Microsoft-keys variable store, SMM and the q35 machine.
- Domain type `kvm` when /dev/kvm is usable here, else `qemu` (TCG). The CPU is the
  one `cpu_choice.py` found this host can start, by default the host's (kvm) or QEMU's
  `max` model (TCG), never the default qemu64, which lacks the x86-64-v2 features
  current distributions require.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from ..errors import InvalidArgument
from ..disks.ovf_writer import safe_name

OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"
OVMF_CODE_SECBOOT = OVMF_DIR / "OVMF_CODE_4M.secboot.fd"
OVMF_VARS_SECBOOT = OVMF_DIR / "OVMF_VARS_4M.ms.fd"

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
MACHINES = ("q35", "pc")
DOMAIN_TYPES = ("kvm", "qemu")
FIRMWARES = ("bios", "uefi")
OS_FAMILIES = ("linux", "windows", "unknown")
DISK_FORMATS = ("qcow2", "raw")
NIC_KINDS = ("network", "bridge")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_LINUX_WORDS = ("linux", "ubuntu", "debian", "rhel", "centos", "fedora", "sles", "suse",
                "oracle", "rocky", "alma", "amazon", "coreos", "photon", "mandriva",
                "asianux", "turbolinux", "flatcar")


@dataclass(frozen=True)
class GuestCpu:
    """The `<cpu>` element: a libvirt CPU mode (host-passthrough, host-model, maximum,
    custom), the model for custom, features turned off, and libvirt's check (none: start
    with what the host gives; partial: refuse a model the host cannot run in full)."""

    mode: str
    model: str = ""
    disabled: tuple[str, ...] = ()
    check: str = "none"

    def describe(self) -> str:
        text = f"model {self.model}" if self.mode == "custom" else self.mode
        return text + (f" without {', '.join(self.disabled)}" if self.disabled else "")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "model": self.model, "disabled_features": list(self.disabled)}


def default_cpu(domain_type: str) -> GuestCpu:
    """The host's CPU under KVM, all that TCG can emulate otherwise: never libvirt's
    default qemu64, which lacks the x86-64-v2 features RHEL 9 and other current guests
    need to boot."""
    return GuestCpu("host-passthrough" if domain_type == "kvm" else "maximum")


@dataclass
class DomainDisk:
    path: Path  # on the host at the URI (for a volume: its path, as the pool reports it)
    format: str = "qcow2"  # qcow2 | raw
    pool: str = ""  # or a volume of this storage pool (kvm/targets.py)
    volume: str = ""


@dataclass
class DomainNic:
    network: str   # the libvirt network, or the host bridge when kind is "bridge"
    mac: str = ""  # empty: libvirt picks one
    kind: str = "network"  # network | bridge


@dataclass
class DomainSpec:
    name: str
    memory_mb: int
    vcpus: int
    disks: list[DomainDisk]            # in boot order: the first one boots
    nics: list[DomainNic] = field(default_factory=list)
    uuid: str = ""                     # kept when given, else libvirt generates one
    firmware: str = "bios"             # bios | uefi
    secure_boot: bool = False
    machine: str = "q35"               # q35 | pc
    os_family: str = "unknown"         # linux | windows | unknown (see guest_family)
    domain_type: str = ""              # kvm | qemu | "" = detect_domain_type()
    cpu: GuestCpu | None = None        # None: default_cpu(domain_type)
    serial_log: Path | None = None     # also copy the serial console to this file


def guest_family(guest_os: str) -> str:
    """linux | windows | unknown from a guest OS id or name ('rhel8_64Guest', 'Windows Server')."""
    text = guest_os.lower()
    if text.startswith("win") or "windows" in text:
        return "windows"
    if any(word in text for word in _LINUX_WORDS):
        return "linux"
    return "unknown"


def serial_log_beside(disk: Path, vm_name: str) -> Path:
    """Where an imported VM's serial console is logged: next to its boot disk."""
    return Path(disk).parent / f"{safe_name(vm_name)}.serial.log"


def is_uuid(text: str) -> bool:
    return bool(_UUID_RE.match(text))


def detect_domain_type() -> str:
    """`kvm` when this host can open /dev/kvm, else `qemu` (software emulation)."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def disk_bus(os_family: str) -> str:
    return "virtio" if os_family == "linux" else "sata"


def nic_model(os_family: str) -> str:
    return "virtio" if os_family == "linux" else "e1000e"


def domain_notes(spec: DomainSpec) -> list[str]:
    """Human notes on choices a user may want to revisit after the import."""
    notes = []
    if spec.disks and disk_bus(spec.os_family) == "sata":
        notes.append(f"disks attached on SATA because the guest OS is {spec.os_family}: "
                     "switch to virtio after installing the virtio drivers for better speed")
    return notes


def check_spec(spec: DomainSpec) -> None:
    """Raise InvalidArgument for anything libvirt would refuse or the guest could not boot."""
    if not spec.name or "/" in spec.name or len(spec.name) > 200:
        raise InvalidArgument("vm_name", "a non-empty name of at most 200 characters without '/'")
    if spec.uuid and not is_uuid(spec.uuid):
        raise InvalidArgument("uuid", "a UUID such as 4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    if spec.memory_mb < 1:
        raise InvalidArgument("memory_mb", "an integer >= 1")
    if spec.vcpus < 1:
        raise InvalidArgument("vcpus", "an integer >= 1")
    if not spec.disks:
        raise InvalidArgument("disk_paths", "at least one disk")
    _check_choice("firmware", spec.firmware, FIRMWARES)
    _check_choice("machine", spec.machine, MACHINES)
    _check_choice("os_type", spec.os_family, OS_FAMILIES)
    if spec.domain_type:
        _check_choice("domain_type", spec.domain_type, DOMAIN_TYPES)
    if spec.secure_boot and (spec.firmware != "uefi" or spec.machine != "q35"):
        raise InvalidArgument("secure_boot", "needs firmware uefi and machine q35")
    for i, disk in enumerate(spec.disks):
        _check_choice(f"disks[{i}].format", disk.format, DISK_FORMATS)
        if not Path(disk.path).is_absolute():
            raise InvalidArgument(f"disks[{i}].path", "an absolute path")
    for i, nic in enumerate(spec.nics):
        if nic.mac and not _MAC_RE.match(nic.mac):
            raise InvalidArgument(f"nics[{i}].mac", "a MAC address such as 00:50:56:aa:bb:cc")
        if not nic.network:
            raise InvalidArgument(f"nics[{i}].network", "a libvirt network name")
        _check_choice(f"nics[{i}].kind", nic.kind, NIC_KINDS)


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise InvalidArgument(name, "one of " + ", ".join(choices))


def build_domain_xml(spec: DomainSpec) -> str:
    """The domain XML for `spec` (checked first with check_spec)."""
    check_spec(spec)
    domain_type = spec.domain_type or detect_domain_type()
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = spec.name
    if spec.uuid:
        etree.SubElement(root, "uuid").text = spec.uuid
    etree.SubElement(root, "memory", unit="MiB").text = str(spec.memory_mb)
    etree.SubElement(root, "vcpu", placement="static").text = str(spec.vcpus)
    add_cpu(root, spec.cpu or default_cpu(domain_type))
    _add_os(root, spec)
    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")
    etree.SubElement(features, "apic")
    if spec.secure_boot:
        etree.SubElement(features, "smm", state="on")
    etree.SubElement(root, "clock", offset="localtime" if spec.os_family == "windows" else "utc")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"
    devices = etree.SubElement(root, "devices")
    _add_disks(devices, spec)
    _add_nics(devices, spec)
    _add_console(devices, spec)
    graphics = etree.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes",
                                listen="127.0.0.1")
    etree.SubElement(graphics, "listen", type="address", address="127.0.0.1")
    video = etree.SubElement(devices, "video")
    etree.SubElement(video, "model", type="vga")
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def add_cpu(root: etree._Element, cpu: GuestCpu) -> None:
    """Append `<cpu>` for `cpu` to the domain element `root`."""
    element = etree.SubElement(root, "cpu", mode=cpu.mode, check=cpu.check)
    if cpu.mode == "custom":
        element.set("match", "exact")
        etree.SubElement(element, "model", fallback="forbid").text = cpu.model
    for name in cpu.disabled:
        etree.SubElement(element, "feature", policy="disable", name=name)


def _add_os(root: etree._Element, spec: DomainSpec) -> None:
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    if spec.firmware != "uefi":
        return
    code, variables = ((OVMF_CODE_SECBOOT, OVMF_VARS_SECBOOT) if spec.secure_boot
                       else (OVMF_CODE, OVMF_VARS))
    loader = etree.SubElement(os_el, "loader", readonly="yes", type="pflash")
    if spec.secure_boot:
        loader.set("secure", "yes")
    loader.text = str(code)
    etree.SubElement(os_el, "nvram", template=str(variables))


def _add_disks(devices: etree._Element, spec: DomainSpec) -> None:
    bus = disk_bus(spec.os_family)
    prefix = "vd" if bus == "virtio" else "sd"
    for index, disk in enumerate(spec.disks):
        element = etree.SubElement(devices, "disk", type="volume" if disk.pool else "file",
                                   device="disk")
        etree.SubElement(element, "driver", name="qemu", type=disk.format)
        if disk.pool:
            etree.SubElement(element, "source", pool=disk.pool, volume=disk.volume)
        else:
            etree.SubElement(element, "source", file=str(disk.path))
        etree.SubElement(element, "target", dev=prefix + _disk_letters(index), bus=bus)
        etree.SubElement(element, "boot", order=str(index + 1))


def _disk_letters(index: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa (the kernel's naming)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def _add_nics(devices: etree._Element, spec: DomainSpec) -> None:
    for nic in spec.nics:
        element = etree.SubElement(devices, "interface", type=nic.kind)
        if nic.mac:
            etree.SubElement(element, "mac", address=nic.mac.lower())
        etree.SubElement(element, "source", {nic.kind: nic.network})
        etree.SubElement(element, "model", type=nic_model(spec.os_family))


def _add_console(devices: etree._Element, spec: DomainSpec) -> None:
    serial = etree.SubElement(devices, "serial", type="pty")
    if spec.serial_log is not None:
        etree.SubElement(serial, "log", file=str(spec.serial_log), append="off")
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(devices, "console", type="pty")
    etree.SubElement(console, "target", type="serial", port="0")
    # the QEMU guest agent's channel: libvirt reports whether an agent is connected
    agent = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(agent, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
