"""Domain XML: every variant we generate passes virt-xml-validate and says what we meant."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lxml import etree

from hypersdk.service.errors import InvalidArgument
from hypersdk.service.kvm.domain_xml import (
    OVMF_CODE, OVMF_CODE_SECBOOT, OVMF_VARS, OVMF_VARS_SECBOOT, DomainDisk, DomainNic, DomainSpec,
    build_domain_xml, detect_domain_type, domain_notes, guest_family)

MACS = ["00:50:56:AA:00:01", "00:50:56:aa:00:02"]


def spec_for(tmp_path: Path, *, firmware="bios", secure_boot=False, disks=1, nics=0,
             os_family="unknown", **extra) -> DomainSpec:
    return DomainSpec(
        name=f"vm-{firmware}-{disks}-{nics}-{os_family}", memory_mb=512, vcpus=2,
        disks=[DomainDisk(tmp_path / f"disk{i}.qcow2", "qcow2" if i % 2 == 0 else "raw")
               for i in range(disks)],
        nics=[DomainNic("default", MACS[i]) for i in range(nics)],
        firmware=firmware, secure_boot=secure_boot, os_family=os_family, **extra)


def validate_with_libvirt_schema(xml: str, tmp_path: Path) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout + xml


VARIANTS = [
    dict(firmware="bios", disks=1, nics=0, os_family="linux"),
    dict(firmware="bios", disks=3, nics=2, os_family="windows"),
    dict(firmware="uefi", disks=1, nics=2, os_family="unknown"),
    dict(firmware="uefi", disks=3, nics=0, os_family="linux"),
    dict(firmware="uefi", secure_boot=True, disks=3, nics=2, os_family="windows"),
    dict(firmware="bios", disks=1, nics=0, os_family="unknown", machine="pc"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_every_variant_passes_virt_xml_validate(tmp_path, variant):
    xml = build_domain_xml(spec_for(tmp_path, **variant))
    validate_with_libvirt_schema(xml, tmp_path)


def test_linux_guest_gets_virtio_disks_in_boot_order_and_virtio_nics(tmp_path):
    root = etree.fromstring(build_domain_xml(spec_for(tmp_path, disks=3, nics=2,
                                                      os_family="linux")))
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc"]
    assert {d.find("target").get("bus") for d in disks} == {"virtio"}
    assert [d.find("boot").get("order") for d in disks] == ["1", "2", "3"]
    assert [d.find("source").get("file") for d in disks] == [
        str(tmp_path / f"disk{i}.qcow2") for i in range(3)]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw", "qcow2"]
    nics = root.findall("devices/interface")
    assert [n.find("mac").get("address") for n in nics] == [m.lower() for m in MACS]
    assert {n.find("model").get("type") for n in nics} == {"virtio"}
    assert {n.find("source").get("network") for n in nics} == {"default"}
    assert root.find("os/boot") is None  # per-device boot order only


def test_a_bridge_nic_sits_on_the_host_bridge_and_validates(tmp_path):
    spec = spec_for(tmp_path, disks=1, nics=2, os_family="linux")
    spec.nics[1] = DomainNic("br0", MACS[1], kind="bridge")
    xml = build_domain_xml(spec)
    validate_with_libvirt_schema(xml, tmp_path)
    first, second = etree.fromstring(xml).findall("devices/interface")
    assert (first.get("type"), first.find("source").attrib) == ("network", {"network": "default"})
    assert (second.get("type"), second.find("source").attrib) == ("bridge", {"bridge": "br0"})
    assert second.find("mac").get("address") == MACS[1].lower()


@pytest.mark.parametrize("os_family", ["windows", "unknown"])
def test_windows_and_unknown_guests_get_sata_and_e1000e_with_a_note(tmp_path, os_family):
    spec = spec_for(tmp_path, disks=2, nics=1, os_family=os_family)
    root = etree.fromstring(build_domain_xml(spec))
    assert [d.find("target").get("dev") for d in root.findall("devices/disk")] == ["sda", "sdb"]
    assert {d.find("target").get("bus") for d in root.findall("devices/disk")} == {"sata"}
    assert root.find("devices/interface/model").get("type") == "e1000e"
    assert any("SATA" in note and os_family in note for note in domain_notes(spec))


def test_linux_guest_has_no_note(tmp_path):
    assert domain_notes(spec_for(tmp_path, os_family="linux")) == []


def test_uefi_uses_ovmf_loader_and_nvram_template(tmp_path):
    root = etree.fromstring(build_domain_xml(spec_for(tmp_path, firmware="uefi")))
    loader = root.find("os/loader")
    assert loader.text == str(OVMF_CODE) and loader.get("type") == "pflash"
    assert loader.get("secure") is None
    assert root.find("os/nvram").get("template") == str(OVMF_VARS)
    assert OVMF_CODE.is_file() and OVMF_VARS.is_file()  # Debian's ovmf package


def test_secure_boot_uses_secboot_loader_ms_vars_and_smm(tmp_path):
    root = etree.fromstring(build_domain_xml(spec_for(tmp_path, firmware="uefi",
                                                      secure_boot=True)))
    assert root.find("os/loader").text == str(OVMF_CODE_SECBOOT)
    assert root.find("os/loader").get("secure") == "yes"
    assert root.find("os/nvram").get("template") == str(OVMF_VARS_SECBOOT)
    assert root.find("features/smm").get("state") == "on"
    assert OVMF_CODE_SECBOOT.is_file() and OVMF_VARS_SECBOOT.is_file()


def test_bios_has_no_loader_and_q35_is_the_default_machine(tmp_path):
    root = etree.fromstring(build_domain_xml(spec_for(tmp_path)))
    assert root.find("os/loader") is None
    assert root.find("os/type").get("machine") == "q35"


def test_name_uuid_memory_vcpus_console_and_graphics(tmp_path):
    spec = spec_for(tmp_path, uuid="4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
                    serial_log=tmp_path / "serial.log")
    root = etree.fromstring(build_domain_xml(spec))
    assert root.findtext("name") == spec.name
    assert root.findtext("uuid") == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "512"
    assert root.findtext("vcpu") == "2"
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/serial/log").get("file") == str(tmp_path / "serial.log")
    assert root.find("devices/console/target").get("type") == "serial"
    graphics = root.find("devices/graphics")
    assert graphics.get("type") == "vnc" and graphics.get("listen") == "127.0.0.1"


def test_domain_type_is_configurable_and_autodetected(tmp_path, monkeypatch):
    assert etree.fromstring(build_domain_xml(spec_for(tmp_path, domain_type="qemu"))).get(
        "type") == "qemu"
    monkeypatch.setattr("os.access", lambda path, mode: False)
    assert detect_domain_type() == "qemu"
    assert etree.fromstring(build_domain_xml(spec_for(tmp_path))).get("type") == "qemu"
    monkeypatch.setattr("os.access", lambda path, mode: path == "/dev/kvm")
    assert detect_domain_type() == "kvm"


def test_windows_clock_is_localtime(tmp_path):
    root = etree.fromstring(build_domain_xml(spec_for(tmp_path, os_family="windows")))
    assert root.find("clock").get("offset") == "localtime"


@pytest.mark.parametrize("change, field", [
    (dict(memory_mb=0), "memory_mb"),
    (dict(vcpus=0), "vcpus"),
    (dict(name="a/b"), "vm_name"),
    (dict(uuid="not-a-uuid"), "uuid"),
    (dict(firmware="coreboot"), "firmware"),
    (dict(secure_boot=True), "secure_boot"),  # with BIOS
    (dict(os_family="beos"), "os_type"),
    (dict(disks=[]), "disk_paths"),
    (dict(nics=[DomainNic("default", "zz:zz")]), "nics[0].mac"),
    (dict(disks=[DomainDisk(Path("relative.qcow2"))]), "disks[0].path"),
    (dict(disks=[DomainDisk(Path("/x.vmdk"), "vmdk")]), "disks[0].format"),
])
def test_bad_specs_name_the_field(tmp_path, change, field):
    spec = spec_for(tmp_path)
    for key, value in change.items():
        setattr(spec, key, value)
    with pytest.raises(InvalidArgument) as info:
        build_domain_xml(spec)
    assert info.value.field == field


@pytest.mark.parametrize("guest_os, family", [
    ("rhel8_64Guest", "linux"), ("ubuntu64Guest", "linux"), ("otherLinux64Guest", "linux"),
    ("debian11_64Guest", "linux"), ("windows2019srv_64Guest", "windows"),
    ("Microsoft Windows Server 2022", "windows"), ("winNetEnterpriseGuest", "windows"),
    ("freebsd12_64Guest", "unknown"), ("", "unknown"),
])
def test_guest_family(guest_os, family):
    assert guest_family(guest_os) == family


@pytest.mark.parametrize("domain_type, mode", [("kvm", "host-passthrough"), ("qemu", "maximum")])
def test_cpu_is_never_the_default_qemu64(tmp_path, domain_type, mode):
    xml = build_domain_xml(spec_for(tmp_path, domain_type=domain_type))
    assert etree.fromstring(xml).find("cpu").get("mode") == mode
    validate_with_libvirt_schema(xml, tmp_path)
