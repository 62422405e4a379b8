"""Export jobs against the govmomi simulator: OVA/OVF/disk output, faults, bad input."""
from __future__ import annotations

import asyncio
import os
import tarfile
from pathlib import Path

import pytest
from lxml import etree

from hypersdk.service.config import parse_config
from hypersdk.service.errors import AlreadyExists, Failed, InvalidArgument, NotFound
from hypersdk.service.disks import diskspace
from hypersdk.service.disks.ovf_writer import OVF, RASD
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.images import same_image, sha256_file
from tests.support.wait import until
from tests.vcsim.harness import find_vm, give_disks

from .conftest import DISK_SIZES, EXPORT_VM, make_config
from .fake_context import FakeJobContext, FakeSubmitContext, job_context, run_job
from .fault_proxy import FaultInjectingProxy
from .helpers import KIND, definition


async def export(config, registry, **overrides) -> tuple[dict, FakeJobContext]:
    ctx = job_context(KIND, definition(**overrides), config, registry)
    return await run_job(KIND, ctx), ctx


def check_manifest(mf: Path, directory: Path) -> list[str]:
    names = []
    for line in mf.read_text().splitlines():
        name, digest = line.removeprefix("SHA256(").split(")= ")
        assert sha256_file(directory / name) == digest, name
        names.append(name)
    return names


def parse_ovf(path: Path):
    tree = etree.parse(str(path))
    ns = {"ovf": OVF, "rasd": RASD}
    items = {}
    for item in tree.iterfind(".//ovf:VirtualHardwareSection/ovf:Item", ns):
        kind = int(item.findtext("rasd:ResourceType", namespaces=ns))
        items.setdefault(kind, []).append(item)
    capacities = [int(d.get(f"{{{OVF}}}capacity")) for d in tree.iterfind(".//ovf:Disk", ns)]
    return tree, items, capacities, ns


def check_ovf(path: Path, *, cdrom: bool = False) -> None:
    tree, items, capacities, ns = parse_ovf(path)
    formats = {d.get(f"{{{OVF}}}format") for d in tree.iterfind(".//ovf:Disk", ns)}
    assert formats == {"http://www.vmware.com/interfaces/specifications/vmdk.html#sparse"}
    assert items[3][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "1"
    assert items[4][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "32"
    assert capacities == DISK_SIZES
    assert len(items[17]) == 2 and len(items[10]) == 1 and len(items[6]) == 1
    parents = {d.findtext("rasd:Parent", namespaces=ns) for d in items[17]}
    assert parents == {items[6][0].findtext("rasd:InstanceID", namespaces=ns)}
    assert (15 in items) == cdrom


async def test_export_ova_with_two_disks(config, registry, uploaded, tmp_path):
    result, ctx = await export(config, registry)
    export_dir = Path(config.export.base_path) / "vm1"
    ova = export_dir / f"{EXPORT_VM}.ova"
    assert result["ova"] == str(ova) and os.listdir(export_dir) == [ova.name]
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names == [f"{EXPORT_VM}.ovf", f"{EXPORT_VM}.mf", f"{EXPORT_VM}-disk1.vmdk",
                         f"{EXPORT_VM}-disk2.vmdk"]
        unpacked = tmp_path / "unpacked"
        tar.extractall(unpacked)  # our own archive; extraction filters need Python >= 3.11.4
    assert check_manifest(unpacked / names[1], unpacked) == [names[0], *names[2:]]
    for disk, name in zip(uploaded, names[2:]):
        assert same_image(disk.local_vmdk, unpacked / name)
    check_ovf(unpacked / names[0])
    assert [d["sha256"] for d in result["disks"]] == [sha256_file(unpacked / n) for n in names[2:]]
    assert ctx.done == ctx.total > 0
    assert ctx.owned == [] and result["hyper2kvm"] == {"mode": "export-only"}
    text = ctx.text()
    assert "no export lease" in text and "disk 2/2 done" in text


async def test_export_ovf_keeps_cdrom_when_asked(config, registry, uploaded):
    result, _ = await export(config, registry, export_method="ovf",
                             options={"remove_cdrom": False})
    export_dir = Path(result["export_dir"])
    assert sorted(os.listdir(export_dir)) == sorted(
        [f"{EXPORT_VM}.ovf", f"{EXPORT_VM}.mf", f"{EXPORT_VM}-disk1.vmdk",
         f"{EXPORT_VM}-disk2.vmdk"])
    check_manifest(Path(result["manifest"]), export_dir)
    check_ovf(Path(result["ovf"]), cdrom=True)
    for disk, entry in zip(uploaded, result["disks"]):
        assert same_image(disk.local_vmdk, Path(entry["path"]))
        assert entry["bytes"] == disk.local_vmdk.stat().st_size


async def test_compress_writes_stream_optimized_disks(config, registry, uploaded, tmp_path):
    result, ctx = await export(config, registry, options={"compress": True})
    unpacked = tmp_path / "unpacked"
    with tarfile.open(result["ova"]) as tar:
        names = tar.getnames()
        tar.extractall(unpacked)  # our own archive; extraction filters need Python >= 3.11.4
    check_manifest(unpacked / names[1], unpacked)
    tree, _, _, ns = parse_ovf(unpacked / names[0])
    formats = {d.get(f"{{{OVF}}}format") for d in tree.iterfind(".//ovf:Disk", ns)}
    assert formats == {"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"}
    for disk, name in zip(uploaded, names[2:]):
        assert same_image(disk.local_vmdk, unpacked / name)
        assert (unpacked / name).stat().st_size < disk.local_vmdk.stat().st_size
    assert ctx.done == ctx.total and "as a stream-optimized VMDK" in ctx.text()


async def test_export_disk_method_writes_disks_and_manifest(config, registry, uploaded):
    result, _ = await export(config, registry, export_method="disk")
    export_dir = Path(result["export_dir"])
    assert sorted(os.listdir(export_dir)) == sorted(
        [f"{EXPORT_VM}.mf", f"{EXPORT_VM}-disk1.vmdk", f"{EXPORT_VM}-disk2.vmdk"])
    assert len(check_manifest(Path(result["manifest"]), export_dir)) == 2


async def test_dropped_connections_resume_byte_identical(tmp_path, sim, uploaded):
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=1_500_000, cuts=2).start()
    config = make_config(tmp_path, sim, port=proxy.port)
    registry = ProviderRegistry(config)
    try:
        result, ctx = await export(config, registry, export_method="ovf")
    finally:
        await registry.close()
        await proxy.close()
    assert proxy.cuts_done == 2
    assert ctx.text().count("resumed at byte") == 2
    for disk, entry in zip(uploaded, result["disks"]):
        assert same_image(disk.local_vmdk, Path(entry["path"]))
        assert Path(entry["path"]).read_bytes() == disk.local_vmdk.read_bytes()


async def test_too_many_drops_fail_cleanly(tmp_path, sim, uploaded):
    # each disk file is ~4.2 MB: three attempts of 0.5 MB cannot finish it
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=500_000, cuts=None).start()
    config = make_config(tmp_path, sim, port=proxy.port)
    registry = ProviderRegistry(config)
    try:
        with pytest.raises(Failed, match=r"failed after 3 attempts \(export.max_retries is 2\)"):
            await export(config, registry)
    finally:
        await registry.close()
        await proxy.close()
    assert not any(Path(config.export.base_path).iterdir())  # vm1 was the job's: gone


async def test_powered_on_vm_is_refused_without_shutdown(config, registry, si):
    with pytest.raises(Failed, match=r"is poweredOn.*options.shutdown_vm: true"):
        await export(config, registry, vm_identifier="DC0_H0_VM1")
    assert not any(Path(config.export.base_path).iterdir())  # vm1 was the job's: gone


async def test_shutdown_and_restore_power_state(config, registry, si):
    result, ctx = await export(config, registry, vm_identifier="DC0_H0_VM1",
                               export_method="disk",
                               options={"shutdown_vm": True, "restore_power_state": True})
    assert "shutting down the guest" in ctx.text() and "powering on" in ctx.text()
    assert find_vm(si, "DC0_H0_VM1").runtime.powerState == "poweredOn"
    assert len(result["disks"]) == 1


async def test_unknown_vm_is_not_found_and_writes_nothing(config, registry):
    with pytest.raises(NotFound, match="did you mean"):
        await export(config, registry, vm_identifier="DC0_H0_VMX")
    assert not any(Path(config.export.base_path).iterdir())


async def test_not_enough_free_space(small_disk, sim, uploaded):
    """The export base on a real 4 MiB tmpfs: the 48 MiB export is refused before any
    download, saying what it needs and what is free."""
    config = make_config(small_disk, sim)
    base = Path(config.export.base_path)
    free = diskspace.free_bytes(base)
    registry = ProviderRegistry(config)
    try:
        with pytest.raises(Failed) as refused:
            await export(config, registry)
    finally:
        await registry.close()
    assert str(refused.value) == (
        f"not enough free space in {base / 'vm1'}: exporting {EXPORT_VM} as ova needs "
        f"48.0 MiB (50331648 bytes), only {diskspace.human_bytes(free)} ({free} bytes) "
        "are free")
    assert not any(base.iterdir())  # vm1 was the job's: gone


async def test_existing_output_is_not_overwritten(config, registry, uploaded):
    target = Path(config.export.base_path) / "vm1"
    target.mkdir()
    (target / f"{EXPORT_VM}.ova").write_text("keep me")
    with pytest.raises(AlreadyExists, match=f"{EXPORT_VM}.ova"):
        await export(config, registry)
    assert (target / f"{EXPORT_VM}.ova").read_text() == "keep me"


@pytest.mark.parametrize("overrides, field", [
    ({"export_path": "/etc/hypersdk-x"}, "export_path"),
    ({"export_path": "../outside"}, "export_path"),
    ({"export_path": "a/../../b"}, "export_path"),
    ({"export_method": "zip"}, "export_method"),
    ({"provider": "vshpere"}, "provider"),
    ({"colour": "red"}, "colour"),
    ({"options": {"shutdown": True}}, "options.shutdown"),
    ({"options": {"compress": "yes"}}, "options.compress"),
    ({"vm_identifier": ""}, "vm_identifier"),
    ({"hyper2kvm_integration": {"enabled": "yes"}}, "hyper2kvm_integration.enabled"),
])
def test_bad_definitions_are_refused(config, overrides, field):
    registry = ProviderRegistry(config)
    with pytest.raises(InvalidArgument) as err:
        KIND.validate(definition(**overrides), FakeSubmitContext(config, registry))
    assert err.value.field == field
    assert not any(Path(config.export.base_path).iterdir())


@pytest.mark.parametrize("options, field, rule", [
    ("fast", "options", "must be a JSON object"),
    ({"compress": "yes"}, "options.compress", "true or false"),
    ({"shutdown_timeout": 0}, "options.shutdown_timeout", "a number of seconds > 0"),
    ({"shutdown_timeout": True}, "options.shutdown_timeout", "a number of seconds > 0"),
    ({"provider_options": []}, "options.provider_options", "must be a JSON object"),
    ({"provider_options": {"shutdown_timeout": 5}}, "options.provider_options.shutdown_timeout",
     "belongs in options.shutdown_timeout"),
    ({"restore_power_state": True}, "options.restore_power_state", "needs shutdown_vm: true"),
    ({"shutdown": True}, "options.shutdown", "unknown field (known: shutdown_vm, "
     "restore_power_state, remove_cdrom, compress, shutdown_timeout, provider_options)"),
], ids=["not-object", "not-bool", "zero-timeout", "bool-timeout", "provider-list",
        "provider-timeout", "restore-alone", "unknown"])
def test_bad_export_options_name_the_field_and_the_rule(config, options, field, rule):
    registry = ProviderRegistry(config)
    with pytest.raises(InvalidArgument) as err:
        KIND.validate(definition(options=options), FakeSubmitContext(config, registry))
    assert (err.value.field, err.value.rule) == (field, rule)


async def test_symlink_out_of_the_base_is_refused(config, registry, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (Path(config.export.base_path) / "link").symlink_to(outside)
    with pytest.raises(InvalidArgument, match=r"export_path: .*/link/vm reaches outside .* "
                                              r"through a symlink: refused"):
        await export(config, registry, export_path="link/vm")
    assert not any(outside.iterdir())


def test_absolute_path_inside_the_base_is_accepted(config):
    registry = ProviderRegistry(config)
    inside = str(Path(config.export.base_path) / "a" / "b")
    checked = KIND.validate(definition(export_path=inside), FakeSubmitContext(config, registry))
    assert checked["export_path"] == inside
    assert checked["options"]["remove_cdrom"] is True
    assert not (Path(config.export.base_path) / "a").exists()


async def test_cancelled_export_leaves_nothing(tmp_path, sim, uploaded):
    proxy = await FaultInjectingProxy(sim.host, sim.port, cut_after=1 << 40, cuts=0,
                                      delay=0.05).start()
    config = make_config(tmp_path, sim, port=proxy.port)
    registry = ProviderRegistry(config)
    ctx = job_context(KIND, definition(), config, registry)
    task = asyncio.ensure_future(run_job(KIND, ctx))
    try:
        await until(lambda: ctx.done >= 1_000_000 or task.done(), what="a megabyte exported")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await registry.close()
        await proxy.close()
    assert not any(Path(config.export.base_path).iterdir())  # vm1 was the job's: gone


async def test_two_named_vsphere_endpoints(tmp_path, sim):
    base = tmp_path / "exports"
    base.mkdir()
    document = {"export": {"base_path": str(base)},
                "providers": {"vc-east": sim.provider_settings(),
                              "vc-west": sim.provider_settings(connection_pool_size=1)}}
    config = parse_config(document, "(test)", env={})
    registry = ProviderRegistry(config)
    try:
        for name in ("vc-east", "vc-west"):
            provider = await registry.get(name)
            assert provider.name == name and len(await provider.list_vms({})) == 4
        checked = KIND.validate(definition(provider="vc-west"), FakeSubmitContext(config, registry))
        assert checked["provider"] == "vc-west"
    finally:
        await registry.close()


async def test_descriptor_with_flat_extent_is_joined(config, registry, sim, si, tmp_path):
    """The usual datastore layout: disk.vmdk (descriptor) + disk-flat.vmdk (data)."""
    work = tmp_path / "flat-upload"
    work.mkdir()
    uploaded = give_disks(sim, si, EXPORT_VM, DISK_SIZES, work, flat=True)
    result, ctx = await export(config, registry, export_method="ovf")
    assert "extent 1/1 done" in ctx.text() and "joining 1 extent(s)" in ctx.text()
    export_dir = Path(result["export_dir"])
    assert sorted(os.listdir(export_dir)) == sorted(
        [f"{EXPORT_VM}.ovf", f"{EXPORT_VM}.mf", f"{EXPORT_VM}-disk1.vmdk",
         f"{EXPORT_VM}-disk2.vmdk"])
    check_manifest(Path(result["manifest"]), export_dir)
    check_ovf(Path(result["ovf"]))
    for disk, entry in zip(uploaded, result["disks"]):
        assert same_image(disk.local_vmdk, Path(entry["path"]))
    assert ctx.done == ctx.total


@pytest.mark.parametrize("parallel", [1, 2])
async def test_parallel_disks_bound(tmp_path, sim, uploaded, parallel):
    base = tmp_path / "exports"
    base.mkdir(exist_ok=True)
    config = parse_config({"export": {"base_path": str(base), "parallel_disks": parallel},
                           "providers": {"vsphere": sim.provider_settings()}}, "(test)", env={})
    registry = ProviderRegistry(config)
    try:
        _, ctx = await export(config, registry, export_method="disk")
    finally:
        await registry.close()
    lines = [m for _, m in ctx.lines if m.startswith("disk ")]
    first_done = lines.index(next(m for m in lines if " done:" in m))
    second_start = lines.index(next(m for m in lines if m.startswith("disk 2/2:")))
    assert (second_start > first_done) == (parallel == 1)


async def test_raw_disk_from_another_provider_becomes_stream_optimized_vmdk(tmp_path):
    """OVA/OVF packages carry VMDKs: a raw disk (as the cloud providers export) is rewritten."""
    from hypersdk.service.disks.download import file_sha256
    from hypersdk.service.jobs.export import to_ovf_disk
    from hypersdk.service.disks.ovf_writer import vmdk_create_type
    from hypersdk.service.model import ExportedDisk

    raw = tmp_path / "vm-disk1.raw"
    with open(raw, "wb") as handle:
        handle.truncate(8 << 20)
        handle.seek(3 << 20)
        handle.write(os.urandom(1 << 20))
    size, digest = file_sha256(raw)
    disk = ExportedDisk(path=raw, format="raw", capacity_bytes=size, file_bytes=size,
                        sha256=digest, label="disk 1", key="disk-1")
    copy = tmp_path / "original.raw"
    copy.write_bytes(raw.read_bytes())
    ctx = FakeJobContext({}, None, None)
    converted = await to_ovf_disk(ctx, disk, compress=False)
    assert converted.path == tmp_path / "vm-disk1.vmdk" and not raw.exists()
    assert converted.format == "vmdk" and vmdk_create_type(converted.path) == "streamOptimized"
    assert (converted.file_bytes, converted.sha256) == file_sha256(converted.path)
    assert same_image(copy, converted.path)
    assert ctx.done == ctx.total == size
    with pytest.raises(Failed, match="cannot put a iso disk into an OVF package"):
        await to_ovf_disk(ctx, ExportedDisk(path=copy, format="iso", capacity_bytes=1,
                                            file_bytes=1, sha256=""), compress=False)


def test_ovf_for_a_vm_without_controller_details(tmp_path):
    """Cloud providers do not report controllers: the disks hang off one SCSI controller."""
    from hypersdk.service.disks.ovf_writer import build_ovf
    from hypersdk.service.model import DiskInfo, ExportedDisk, NicInfo, VMInfo
    from tests.vcsim.harness import make_vmdk

    vmdk = make_vmdk(tmp_path / "web-disk1.vmdk", 4 << 20, seed=7)
    vm = VMInfo(identifier="i-0abc", name="web", provider="aws", cpus=2, memory_mb=2048,
                firmware="uefi",
                disks=[DiskInfo(key="vol-1", label="root", capacity_bytes=4 << 20)],
                nics=[NicInfo(key="eni-1", mac="02:00:00:00:00:01", network="subnet-1")])
    disk = ExportedDisk(path=vmdk, format="vmdk", capacity_bytes=4 << 20,
                        file_bytes=vmdk.stat().st_size, sha256="", key="vol-1", label="root")
    path = tmp_path / "web.ovf"
    path.write_bytes(build_ovf(vm, [disk], remove_cdrom=True))
    tree, items, capacities, ns = parse_ovf(path)
    assert capacities == [4 << 20] and len(items[6]) == 1 and 15 not in items
    scsi_id = items[6][0].findtext("rasd:InstanceID", namespaces=ns)
    assert items[17][0].findtext("rasd:Parent", namespaces=ns) == scsi_id
    assert items[3][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "2"
    assert items[4][0].findtext("rasd:VirtualQuantity", namespaces=ns) == "2048"
    firmware = tree.find(".//{http://www.vmware.com/schema/ovf}Config")
    assert firmware.get("{http://www.vmware.com/schema/ovf}value") == "efi"


async def test_vm_name_taken_in_libvirt_fails_before_any_download(tmp_path, sim, uploaded):
    """import_to_kvm: libvirt is asked whether the VM can be imported before the disks
    download, not after. The datastore (/folder) and NFC (/nfc) paths sit behind a proxy
    that refuses them, so a download that started would fail differently and be counted."""
    import libvirt

    proxy = await FaultInjectingProxy(sim.host, sim.port, refuse_paths=("/folder", "/nfc"),
                                      refusal="forbidden").start()
    base = tmp_path / "exports"
    base.mkdir()
    document = {"export": {"base_path": str(base)},
                "providers": {"vsphere": sim.provider_settings(port=proxy.port)},
                "hyper2kvm": {"output_dir": str(tmp_path / "out"),
                              "watch_dir": str(tmp_path / "watch")},
                "libvirt": {"uri": "test:///default"}}
    config = parse_config(document, "(test)", env={})
    registry = ProviderRegistry(config)
    conn = libvirt.open("test:///default")  # the test driver's domains live while it is open
    taken = conn.defineXML(f"<domain type='test'><name>{EXPORT_VM}</name><memory>1024</memory>"
                           f"<os><type>hvm</type></os></domain>")
    ctx = job_context(KIND, definition(hyper2kvm_integration={
        "enabled": True, "auto_convert": True, "import_to_kvm": True}), config, registry)
    try:
        with pytest.raises(AlreadyExists, match=rf"a domain named '{EXPORT_VM}' already exists "
                                                r"at test:///default"):
            await run_job(KIND, ctx)
    finally:
        taken.undefine()
        conn.close()
        await registry.close()
        await proxy.close()
    assert proxy.refused == 0 and ctx.done == ctx.total == 0
    assert ctx.stages == ["discovery"] and len(ctx.stagings) == 0
    assert list(base.iterdir()) == [] and not (tmp_path / "out").exists()


async def test_unknown_provider_options_are_refused_before_anything_is_written(config,
                                                                             registry):
    options = {"shutdown_vm": False, "provider_options": {"colour": "red"}}
    with pytest.raises(InvalidArgument) as caught:
        await export(config, registry, options=options)
    assert caught.value.field == "options.provider_options.colour"
    assert not any(Path(config.export.base_path).iterdir())
