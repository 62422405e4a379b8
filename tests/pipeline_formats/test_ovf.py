"""parse_ovf on a VMware-style OVF, and refusal of DOCTYPEs and entities; the OVA writer stops when asked."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hypersdk.service.errors import Cancelled, InvalidArgument
from hypersdk.service.disks import ovf_writer
from hypersdk.service.disks.ovf import parse_ovf, parse_units

SAMPLE = Path(__file__).with_name("sample.ovf")


def test_sample_ovf_is_read_in_full():
    info = parse_ovf(SAMPLE)
    assert info.name == "web01"
    assert info.cpus == 2
    assert info.memory_bytes == 512 << 20 and info.memory_mb == 512
    assert info.firmware == "efi"
    assert info.os_type == "ubuntu64Guest" and info.os_id == 101
    assert info.hw_version == "vmx-13"
    # Hard disk 2 is listed first in the XML; boot order follows the unit number.
    assert [(d.disk_id, d.file_href, d.capacity_bytes, d.unit, d.boot_order)
            for d in info.disks] == [("vmdisk1", "web01-disk1.vmdk", 16 << 30, 0, 1),
                                     ("vmdisk2", "web01-disk2.vmdk", 512 << 20, 1, 2)]
    assert info.disks[0].controller == "scsi"
    assert info.disks[0].controller_subtype == "VirtualSCSI"
    assert [(n.mac, n.network, n.model) for n in info.nics] == [
        ("00:50:56:aa:bb:cc", "VM Network", "VmxNet3")]
    data = info.to_dict()
    assert data["memory_mb"] == 512 and data["disks"][1]["disk_id"] == "vmdisk2"


def test_bios_is_the_default_firmware_and_memory_units_vary(tmp_path):
    text = SAMPLE.read_text().replace(
        '<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>', "").replace(
        "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
        "<rasd:AllocationUnits>GigaBytes</rasd:AllocationUnits>")
    ovf = tmp_path / "bios.ovf"
    ovf.write_text(text)
    info = parse_ovf(ovf)
    assert info.firmware == "bios"
    assert info.memory_bytes == 512 << 30


def test_virtualbox_style_firmware(tmp_path):
    text = SAMPLE.read_text().replace(
        '<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>', "").replace(
        "</VirtualHardwareSection>",
        '</VirtualHardwareSection><vbox:Machine xmlns:vbox="http://www.virtualbox.org/ovf/machine">'
        '<Hardware><Firmware type="EFI"/></Hardware></vbox:Machine>')
    ovf = tmp_path / "vbox.ovf"
    ovf.write_text(text)
    assert parse_ovf(ovf).firmware == "efi"


@pytest.mark.parametrize("unit,factor", [
    ("byte", 1), ("byte * 2^10", 1024), ("byte * 2^20", 1 << 20), ("byte * 1024", 1024),
    ("MegaBytes", 1 << 20), ("byte * 10^6", 10 ** 6), (None, 1)])
def test_allocation_units(unit, factor):
    assert parse_units(unit, "x") == factor


def test_bad_allocation_unit_is_refused():
    with pytest.raises(InvalidArgument, match="is not bytes"):
        parse_units("hertz * 10^6", "Item 2")


def test_entity_bomb_is_refused(tmp_path):
    ovf = tmp_path / "bomb.ovf"
    ovf.write_text('<?xml version="1.0"?>\n<!DOCTYPE Envelope [\n <!ENTITY a "aaaaaaaaaa">\n'
                   ' <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n'
                   ' <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">\n]>\n'
                   '<Envelope><VirtualSystem><Name>&c;</Name></VirtualSystem></Envelope>\n')
    with pytest.raises(InvalidArgument) as err:
        parse_ovf(ovf)
    assert str(ovf) in str(err.value)
    assert "expands other entities (an entity-expansion bomb)" in str(err.value)


def test_external_entity_is_refused(tmp_path):
    ovf = tmp_path / "xxe.ovf"
    ovf.write_text('<?xml version="1.0"?>\n'
                   '<!DOCTYPE Envelope [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>\n'
                   '<Envelope><VirtualSystem><Name>&xxe;</Name></VirtualSystem></Envelope>\n')
    with pytest.raises(InvalidArgument) as err:
        parse_ovf(ovf)
    assert "external entity 'xxe' (SYSTEM 'file:///etc/passwd') refused" in str(err.value)
    assert "root:" not in str(err.value)


def test_plain_doctype_is_refused(tmp_path):
    ovf = tmp_path / "dt.ovf"
    ovf.write_text('<?xml version="1.0"?>\n<!DOCTYPE Envelope>\n<Envelope/>\n')
    with pytest.raises(InvalidArgument, match="DOCTYPE and entity declarations are refused"):
        parse_ovf(ovf)


def test_not_xml_and_not_ovf(tmp_path):
    bad = tmp_path / "bad.ovf"
    bad.write_text("<Envelope><unclosed></Envelope>")
    with pytest.raises(InvalidArgument, match="not well-formed XML"):
        parse_ovf(bad)
    other = tmp_path / "other.ovf"
    other.write_text("<html/>")
    with pytest.raises(InvalidArgument, match="root element is not Envelope"):
        parse_ovf(other)


@pytest.mark.parametrize("old,new,message", [
    ("<rasd:VirtualQuantity>2</rasd:VirtualQuantity>",
     "<rasd:VirtualQuantity>-2</rasd:VirtualQuantity>", "-2 virtual CPUs: needs at least 1"),
    ('ovf:capacity="16"', 'ovf:capacity="-16"', "capacity -16 is not positive"),
    ("<rasd:VirtualQuantity>512</rasd:VirtualQuantity>",
     "<rasd:VirtualQuantity>lots</rasd:VirtualQuantity>", "'lots' is not an integer"),
])
def test_nonsense_values_are_refused(tmp_path, old, new, message):
    ovf = tmp_path / "nonsense.ovf"
    ovf.write_text(SAMPLE.read_text().replace(old, new, 1))
    with pytest.raises(InvalidArgument, match=message):
        parse_ovf(ovf)


def test_bad_encoding_is_a_clear_error(tmp_path):
    bad = tmp_path / "enc.ovf"
    bad.write_bytes(b'<?xml version="1.0" encoding="UTF-8"?><Envelope>\xff\xfe</Envelope>')
    with pytest.raises(InvalidArgument, match="enc.ovf: not well-formed XML: Invalid bytes"):
        parse_ovf(bad)


def test_disk_item_naming_an_unknown_disk_is_refused(tmp_path):
    ovf = tmp_path / "dangling.ovf"
    ovf.write_text(SAMPLE.read_text().replace("ovf:/disk/vmdisk2", "ovf:/disk/nosuch"))
    with pytest.raises(InvalidArgument, match="names no Disk in DiskSection"):
        parse_ovf(ovf)


def test_write_ova_stops_within_one_buffer_and_removes_the_partial_tar(tmp_path):
    """A cancelled export must not go on packaging: setting `stop` (what run_stoppable
    does on cancel) ends write_ova at its next read, and the half-written OVA is gone."""
    descriptor = tmp_path / "vm.ovf"
    descriptor.write_text("<Envelope/>")
    disk = tmp_path / "vm-disk1.vmdk"
    with open(disk, "wb") as fh:
        fh.truncate(16 * ovf_writer.COPY_BUFFER)
    stop, counted = threading.Event(), []

    def on_bytes(nbytes: int) -> None:
        counted.append(nbytes)
        if sum(counted) > len(descriptor.read_bytes()):
            stop.set()  # cancelled once the disk began

    ova = tmp_path / "vm.ova"
    with pytest.raises(Cancelled, match="packaging the OVA cancelled"):
        ovf_writer.write_ova(ova, [descriptor, disk], on_bytes, stop)
    assert not ova.exists()
    assert sum(counted) <= 2 * ovf_writer.COPY_BUFFER
