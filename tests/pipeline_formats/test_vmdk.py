"""parse_vmdk on images qemu-img makes, and on files that lie or are cut short."""
from __future__ import annotations

import struct

import pytest

from hypersdk.service.errors import Failed, InvalidArgument
from hypersdk.service.disks.vmdk import parse_vmdk

from .helpers import DISK_SIZE, make_image


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
def test_sparse_vmdk_with_embedded_descriptor(tmp_path, subformat):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat=subformat)
    info = parse_vmdk(vmdk)
    assert info["create_type"] == subformat
    assert info["capacity_bytes"] == DISK_SIZE
    assert info["adapter_type"] == "ide"
    assert info["hw_version"] == 4
    assert info["parent"] is None
    assert info["complete"] is True
    assert info["stream_optimized"] is (subformat == "streamOptimized")
    assert info["grain_size_bytes"] == 65536
    assert [(e["type"], e["size_bytes"]) for e in info["extents"]] == [("SPARSE", DISK_SIZE)]


def test_renamed_sparse_file_still_describes_itself(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    renamed = vmdk.rename(tmp_path / "exported-disk1.vmdk")
    info = parse_vmdk(renamed)
    assert info["complete"] is True
    assert info["extents"][0]["path"] == str(renamed)


@pytest.mark.parametrize("subformat,extent_type", [
    ("monolithicFlat", "FLAT"), ("twoGbMaxExtentFlat", "FLAT"),
    ("twoGbMaxExtentSparse", "SPARSE")])
def test_descriptor_file_with_separate_extents(tmp_path, subformat, extent_type):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat=subformat)
    info = parse_vmdk(vmdk)
    assert info["create_type"] == subformat
    assert info["capacity_bytes"] == DISK_SIZE
    assert info["complete"] is True
    assert {e["type"] for e in info["extents"]} == {extent_type}
    assert all(e["present"] for e in info["extents"])


def test_descriptor_ends_at_its_first_nul(tmp_path):
    """qemu-img rewrites a descriptor in place when it sets a new CID; a shorter CID
    leaves the old text's last bytes after the NUL that ends the new one (seen in
    about 1 of 100 monolithicFlat images qemu-img 7.2 made). qemu reads only up to
    that NUL, and so do we."""
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicFlat")
    text = vmdk.read_bytes().split(b"\0", 1)[0]
    vmdk.write_bytes((text + b"\0\n").ljust(512, b"\0"))  # what qemu-img left behind
    info = parse_vmdk(vmdk)
    assert info["create_type"] == "monolithicFlat"
    assert info["capacity_bytes"] == DISK_SIZE
    assert info["complete"] is True


def test_missing_flat_extent_is_incomplete(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicFlat")
    (tmp_path / "disk-flat.vmdk").unlink()
    info = parse_vmdk(vmdk)
    assert info["complete"] is False
    assert info["extents"][0]["present"] is False


def test_short_flat_extent_is_incomplete(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicFlat")
    with open(tmp_path / "disk-flat.vmdk", "r+b") as fh:
        fh.truncate(DISK_SIZE // 2)
    assert parse_vmdk(vmdk)["complete"] is False


def test_delta_disk_reports_its_parent(tmp_path):
    (tmp_path / "child-delta.vmdk").write_bytes(b"\0" * 1024)
    (tmp_path / "child.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=0a0b0c0d\nparentCID=1234abcd\n'
        'createType="monolithicFlat"\nparentFileNameHint="base.vmdk"\n'
        'RW 2 FLAT "child-delta.vmdk" 0\nddb.virtualHWVersion = "13"\n'
        'ddb.adapterType = "lsilogic"\n')
    info = parse_vmdk(tmp_path / "child.vmdk")
    assert info["parent"] == {"cid": "1234abcd", "file_name_hint": "base.vmdk"}
    assert info["cid"] == "0a0b0c0d"
    assert info["hw_version"] == 13
    assert info["adapter_type"] == "lsilogic"


def test_header_lying_about_capacity_is_refused(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicSparse")
    with open(vmdk, "r+b") as fh:
        fh.seek(12)
        fh.write(struct.pack("<Q", 4 * DISK_SIZE // 512))
    with pytest.raises(Failed) as err:
        parse_vmdk(vmdk)
    assert str(vmdk) in str(err.value)
    assert f"header says the capacity is {4 * DISK_SIZE} bytes but the descriptor's extent " \
           f"says {DISK_SIZE}" in str(err.value)


def test_header_with_absurd_capacity_is_refused(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicSparse")
    with open(vmdk, "r+b") as fh:
        fh.seek(12)
        fh.write(struct.pack("<Q", 1 << 60))
    with pytest.raises(Failed, match="above VMDK's limit"):
        parse_vmdk(vmdk)


def test_truncated_stream_optimized_is_incomplete(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="streamOptimized")
    size = vmdk.stat().st_size
    with open(vmdk, "r+b") as fh:
        fh.truncate(size // 2 + 100)
    assert parse_vmdk(vmdk)["complete"] is False


def test_truncated_monolithic_sparse_is_incomplete(tmp_path):
    _raw, vmdk = make_image(tmp_path, "vmdk", subformat="monolithicSparse")
    with open(vmdk, "r+b") as fh:
        fh.truncate(vmdk.stat().st_size - 65536)
    assert parse_vmdk(vmdk)["complete"] is False


def test_garbage_is_not_a_vmdk(tmp_path):
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"\x01\x02garbage" * 100)
    with pytest.raises(InvalidArgument, match="junk.vmdk: not a VMDK"):
        parse_vmdk(junk)


def test_extent_outside_the_directory_is_refused(tmp_path):
    desc = tmp_path / "evil.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "../../etc/shadow" 0\n')
    with pytest.raises(InvalidArgument, match="must be a plain file name in the descriptor.s directory"):
        parse_vmdk(desc)
