"""The local OVA/OVF provider with packages from our own OVF writer and hostile ones."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.errors import Failed, InvalidArgument, NotFound
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.registry import ProviderRegistry

from ..support.fake_sink import FakeExportSink
from ..support.images import same_image
from .conftest import sha256, write_package


async def test_list_and_describe_our_own_ova(provider, imports):
    package = write_package(imports, "web01")
    (imports / "notes.txt").write_text("not a VM")
    [vm] = await provider.list_vms({})
    assert vm.identifier == str(package.ova) and vm.name == "web01"
    info = await provider.get_vm("web01.ova")        # relative to the import directory
    assert (info.cpus, info.memory_mb, info.firmware) == (2, 2048, "uefi")
    assert [(d.capacity_bytes, d.boot_order) for d in info.disks] == [(8 << 20, 1), (4 << 20, 2)]
    assert info.nics[0].mac == "00:50:56:aa:bb:cc"
    assert await provider.list_vms({"name": "db*"}) == []


async def test_ova_round_trips_into_disks_the_pipeline_can_convert(provider, imports, tmp_path):
    package = write_package(imports, "web01")
    target = tmp_path / "staging"
    sink = FakeExportSink()
    vm, disks = await provider.export_disks(str(package.ova), target, ExportOptions(), sink)
    assert vm.name == "web01"
    assert sorted(p.name for p in target.iterdir()) == ["web01-disk1.vmdk", "web01-disk2.vmdk"]
    for disk, raw in zip(disks, package.raws):
        assert disk.format == "vmdk" and disk.sha256 == sha256(disk.path)
        assert same_image(disk.path, raw)
    assert [d.boot_order for d in disks] == [1, 2]
    assert any("manifest" in line and "checked" in line for line in sink.lines)
    assert sink.done == sink.total == package.ova.stat().st_size
    assert package.ova.exists()                       # the source is left alone


async def test_unpacked_ovf_with_manifest_is_copied(provider, imports, tmp_path):
    folder = imports / "app"
    folder.mkdir()
    package = write_package(folder, "app", as_ova=False)
    vm, disks = await provider.export_disks("app/app.ovf", tmp_path / "out", ExportOptions(),
                                            FakeExportSink())
    assert [same_image(d.path, raw) for d, raw in zip(disks, package.raws)] == [True, True]
    assert package.ova.exists() and len(list(folder.glob("*.vmdk"))) == 2


async def test_tampered_disk_fails_the_manifest_and_leaves_nothing(provider, imports, tmp_path):
    folder = imports / "app"
    folder.mkdir()
    write_package(folder, "app", as_ova=False)
    victim = sorted(folder.glob("*.vmdk"))[0]
    with open(victim, "r+b") as handle:
        handle.seek(-100, 2)
        handle.write(b"tampered")
    target = tmp_path / "out"
    with pytest.raises(Failed, match="digest mismatch"):
        await provider.export_disks(str(folder / "app.ovf"), target, ExportOptions(),
                                    FakeExportSink())
    assert not target.exists() or list(target.iterdir()) == []


def hostile_ova(path, members):
    with tarfile.open(path, "w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("members, rule", [
    ([("evil.ovf", "file", b"<x/>"), ("../escape.vmdk", "file", b"x")], "'..'"),
    ([("evil.ovf", "file", b"<x/>"), ("disk.vmdk", "symlink", "/etc/shadow")], "links are refused"),
    ([("evil.ovf", "file", b"<x/>"), ("/abs.vmdk", "file", b"x")], "absolute"),
    ([("a.ovf", "file", b"<x/>"), ("b.ovf", "file", b"<x/>")], "exactly one .ovf"),
])
async def test_hostile_ovas_are_refused_without_leftovers(provider, imports, tmp_path, members,
                                                          rule):
    hostile_ova(imports / "evil.ova", members)
    target = tmp_path / "out"
    with pytest.raises(InvalidArgument) as err:
        await provider.export_disks(str(imports / "evil.ova"), target, ExportOptions(),
                                    FakeExportSink())
    assert rule in str(err.value)
    assert list(target.iterdir()) == [] and not (tmp_path / "escape.vmdk").exists()


async def test_entity_bomb_descriptor_is_refused(provider, imports):
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><x>&b;</x>'
    hostile_ova(imports / "bomb.ova", [("bomb.ovf", "file", bomb)])
    with pytest.raises(InvalidArgument) as refused:
        await provider.get_vm("bomb.ova")
    assert "entity 'b' expands other entities (an entity-expansion bomb)" in str(refused.value)
    [listed] = await provider.list_vms({})
    assert "entity-expansion bomb" in listed.extra["error"]  # listed, with why it is unusable


async def test_paths_outside_the_import_directories_are_refused(provider, imports, tmp_path):
    outside = write_package(tmp_path, "outside")
    (imports / "link.ova").symlink_to(outside.ova)
    for identifier in (str(outside.ova), "link.ova", "../outside.ova",
                       str(imports / ".." / "outside.ova")):
        with pytest.raises(InvalidArgument) as err:
            await provider.get_vm(identifier)
        assert err.value.field == "vm_identifier" and "outside the import directories" in str(err.value)
    with pytest.raises(NotFound):
        await provider.get_vm("missing.ova")
    (imports / "x.txt").write_text("x")
    with pytest.raises(InvalidArgument, match="not an .ova or .ovf"):
        await provider.get_vm("x.txt")


async def test_ova_provider_needs_no_config_section(imports):
    config = parse_config({"ova": {"import_dirs": [str(imports)]}}, "test")
    registry = ProviderRegistry(config)
    provider = await registry.get("ova")
    assert await provider.list_vms({}) == []
    assert {"name": "ova", "type": "ova", "configured": True, "implicit": True,
            "available": True, "reason": "", "warm": False,
            "warm_reason": "it has no changed-block interface wired to warm migration yet"
            } in registry.capabilities()


async def test_ova_from_our_writer_becomes_a_libvirt_domain(provider, imports, tmp_path):
    """The whole way a user's OVA goes: ova provider -> qemu-img convert -> domain."""
    from hypersdk.service.disks.convert import convert_image
    from hypersdk.service.kvm.domain_xml import DomainDisk, DomainNic, DomainSpec
    from hypersdk.service.kvm.libvirt_import import import_domain

    package = write_package(imports, "roundtrip")
    vm, disks = await provider.export_disks("roundtrip.ova", tmp_path / "staging",
                                            ExportOptions(), FakeExportSink())
    converted = []
    for disk, raw in zip(disks, package.raws):
        image = await convert_image(disk.path, tmp_path / f"{disk.path.stem}.qcow2",
                                    out_format="qcow2")
        assert same_image(image.path, raw)
        converted.append(DomainDisk(image.path, "qcow2"))
    spec = DomainSpec(name=vm.name, memory_mb=vm.memory_mb, vcpus=vm.cpus, disks=converted,
                      nics=[DomainNic("default", nic.mac) for nic in vm.nics],
                      firmware=vm.firmware, domain_type="qemu")
    domain = await import_domain("test:///default", spec)
    assert domain.name == "roundtrip"


async def test_one_hostile_file_does_not_break_listing_the_others(provider, imports):
    """A truncated OVA, random bytes named .ova and an .ovf that is not XML are listed
    with the reason each is unusable; the good OVA beside them is listed as usual."""
    good = write_package(imports, "good")
    truncated = good.ova.read_bytes()[:700]
    (imports / "truncated.ova").write_bytes(truncated)
    (imports / "noise.ova").write_bytes(os.urandom(4096))
    (imports / "text.ovf").write_text("this is not XML")
    listed = {Path(vm.identifier).name: vm for vm in await provider.list_vms({})}
    assert set(listed) == {good.ova.name, "truncated.ova", "noise.ova", "text.ovf"}
    assert "error" not in listed[good.ova.name].extra
    for name in ("truncated.ova", "noise.ova", "text.ovf"):
        assert listed[name].extra["error"], name


async def test_an_ova_missing_a_disk_its_ovf_names_fails_and_leaves_nothing(provider, imports,
                                                                           tmp_path):
    (tmp_path / "src").mkdir()
    package = write_package(tmp_path / "src", "partial")
    with tarfile.open(package.ova) as source, \
            tarfile.open(imports / "partial.ova", "w") as target:
        for member in source.getmembers():
            if not member.name.endswith("disk2.vmdk"):
                target.addfile(member, source.extractfile(member))
    out = tmp_path / "out"
    with pytest.raises((Failed, InvalidArgument), match="partial-disk2.vmdk"):
        await provider.export_disks("partial.ova", out, ExportOptions(), FakeExportSink())
    assert not out.exists() or list(out.iterdir()) == []


async def test_unknown_provider_options_are_refused_before_anything_is_read(provider, imports,
                                                                          tmp_path):
    package = write_package(imports, "web01")
    target = tmp_path / "out"
    with pytest.raises(InvalidArgument) as caught:
        await provider.export_disks(str(package.ova), target,
                                    ExportOptions(extra={"colour": "red"}), FakeExportSink())
    assert caught.value.field == "options.provider_options.colour"
    assert not target.exists()
