"""The hyper2kvm_integration block: export-only, built-in Direct Pipeline, daemon hand-off."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hypersdk.service.errors import AlreadyExists, Failed, InvalidArgument, NotFound
from hypersdk.service.jobs.handoff import run_integration, validate_integration
from hypersdk.service.model import ExportedDisk, NicInfo, VMInfo

from .conftest import export_vmdk, fake_job_context, qemu_img


@pytest.fixture
def exported(tmp_path) -> tuple[VMInfo, list[ExportedDisk], Path]:
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    disks = [export_vmdk(export_dir, "data", 1), export_vmdk(export_dir, "boot", 0)]
    vm = VMInfo(identifier="vm-7", name="app-" + uuid.uuid4().hex[:6], provider="vsphere",
                cpus=1, memory_mb=512, guest_os="debian11_64Guest",
                uuid=str(uuid.uuid4()),
                nics=[NicInfo("4000", "00:50:56:00:00:07", "VM Network")])
    return vm, disks, export_dir


def integration(config, **block) -> dict:
    return validate_integration({"enabled": True, **block}, config)


# --- validation ----------------------------------------------------------------------

def test_defaults_are_export_only_with_config_values(config_for):
    config = config_for(hyper2kvm={"default_format": "raw"}, libvirt={"network": "lan"})
    result = validate_integration(None, config)
    assert result["enabled"] is False and result["instance"] == "default"
    assert (result["format"], result["network"]) == ("raw", "lan")


def test_spec_example_block_is_accepted(config_for):
    result = validate_integration({"enabled": True, "auto_convert": False, "daemon_mode": True,
                                   "instance": "vsphere"}, config_for())
    assert result["daemon_mode"] and result["instance"] == "vsphere"


@pytest.mark.parametrize("block, field, rule", [
    ({"enabled": True, "daemon_mode": True, "colour": 1}, "hyper2kvm_integration.colour",
     "unknown field"),
    ({"enabled": "yes"}, "hyper2kvm_integration.enabled", "true or false"),
    ({"enabled": True, "daemon_mode": True, "instance": "a/b"},
     "hyper2kvm_integration.instance", "letters, digits"),
    ({"enabled": True, "auto_convert": True, "format": "vmdk"}, "hyper2kvm_integration.format",
     "one of qcow2, raw"),
    ({"enabled": True, "auto_convert": True, "format": "raw", "compression": True},
     "hyper2kvm_integration.compression", "only qcow2"),
    ({"enabled": True}, "hyper2kvm_integration", "daemon_mode or auto_convert"),
    ({"import_to_kvm": True}, "hyper2kvm_integration.import_to_kvm", "enabled: true"),
    ({"enabled": True, "auto_convert": True, "autostart": True},
     "hyper2kvm_integration.autostart", "import_to_kvm"),
])
def test_bad_blocks_name_the_field(config_for, block, field, rule):
    with pytest.raises(InvalidArgument) as info:
        validate_integration(block, config_for())
    assert info.value.field == field and rule in info.value.rule


def test_not_an_object(config_for):
    with pytest.raises(InvalidArgument, match="hyper2kvm_integration: must be a JSON object"):
        validate_integration(["enabled"], config_for())


# --- running ---------------------------------------------------------------------------

async def test_disabled_does_nothing(config_for, exported, tmp_path):
    vm, disks, export_dir = exported
    config = config_for()
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir, validate_integration({}, config))
    assert result == {"mode": "export-only"}
    assert not (tmp_path / "out").exists() and not (tmp_path / "watch").exists()
    assert ctx.total == 0


async def test_auto_convert_converts_every_disk_and_imports(config_for, exported, tmp_path,
                                                           test_driver):
    vm, disks, export_dir = exported
    config = config_for()
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir, integration(
        config, auto_convert=True, import_to_kvm=True, autostart=True, network="default"))
    out = tmp_path / "out" / vm.name
    assert result["mode"] == "builtin" and result["output_dir"] == str(out)
    paths = [Path(d["path"]) for d in result["disks"]]
    assert paths == [out / "disk-2000.qcow2", out / "disk-2001.qcow2"]  # boot disk first
    for path, source in zip(paths, [disks[1], disks[0]]):
        subprocess.run(["qemu-img", "compare", "-q", str(source.path), str(path)], check=True)
    assert ctx.total == sum(d.capacity_bytes for d in disks) and ctx.done == ctx.total
    assert ctx.stages == ["convert", "import"]
    assert result["import"]["domain"] == vm.name and result["import"]["autostart"]
    domain = test_driver.lookupByName(vm.name)
    assert domain.UUIDString() == vm.uuid
    xml = domain.XMLDesc()
    assert "00:50:56:00:00:07" in xml and "bus='virtio'" in xml
    assert xml.index("disk-2000.qcow2") < xml.index("disk-2001.qcow2")


async def test_auto_convert_never_overwrites_an_earlier_output(config_for, exported, tmp_path):
    vm, disks, export_dir = exported
    config = config_for()
    earlier = tmp_path / "out" / vm.name / "disk-2001.qcow2"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"precious")
    ctx = fake_job_context(config)
    with pytest.raises(AlreadyExists, match=f"{earlier} already exists"):
        await run_integration(ctx, vm, disks, export_dir, integration(config, auto_convert=True))
    ctx.fail()
    assert earlier.read_bytes() == b"precious"
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["disk-2001.qcow2"]


async def run_real_hyper2kvm_on_first_manifest(watch_dir: Path) -> Path:
    """Does what the hyper2kvm@ daemon does with a new manifest, with the real hyper2kvm
    0.2.1: `hyper2kvm --manifest FILE` converts each disk to <output.directory>/<id>.<fmt>."""
    while not (manifests := list(watch_dir.glob("*.json"))):
        await asyncio.sleep(0.02)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "hyper2kvm"), "--manifest", str(manifests[0]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    return manifests[0]


async def test_daemon_mode_hands_off_waits_and_imports(config_for, exported, tmp_path,
                                                       dbusmock_systemd, monkeypatch, test_driver):
    vm, disks, export_dir = exported
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    name = "vsphere-" + uuid.uuid4().hex[:6]
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "active")
    config = config_for()
    ctx = fake_job_context(config)
    daemon = asyncio.create_task(run_real_hyper2kvm_on_first_manifest(tmp_path / "watch" / name))
    result = await run_integration(ctx, vm, disks, export_dir, integration(
        config, daemon_mode=True, instance=name, import_to_kvm=True))
    manifest = await daemon
    assert result["mode"] == "daemon" and result["manifest"] == str(manifest)
    assert result["unit"] == f"hyper2kvm@{name}.service"
    assert f"handed off to hyper2kvm@{name}" in ctx.text()
    assert [Path(d["path"]).name for d in result["disks"]] == ["disk-2000.qcow2",
                                                              "disk-2001.qcow2"]
    assert ctx.stages == ["handoff", "waiting for hyper2kvm", "import"]
    assert test_driver.lookupByName(vm.name).UUIDString() == vm.uuid


async def test_daemon_mode_times_out_clearly(config_for, exported, dbusmock_systemd,
                                             monkeypatch, tmp_path):
    vm, disks, export_dir = exported
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    name = "idle-" + uuid.uuid4().hex[:6]
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "active")
    config = config_for(hyper2kvm={"job_timeout": "0.2s"})
    ctx = fake_job_context(config)
    with pytest.raises(Failed, match=r"no finished output within 0.2 s \(hyper2kvm.job_timeout\)"):
        await run_integration(ctx, vm, disks, export_dir,
                              integration(config, daemon_mode=True, instance=name))
    assert len(list((tmp_path / "watch" / name).glob("*.json"))) == 1
    ctx.fail()  # what the engine does with a failed job: the manifest is withdrawn
    assert not list((tmp_path / "watch" / name).glob("*.json"))


async def test_daemon_mode_with_inactive_unit_falls_back_to_builtin(
        config_for, exported, tmp_path, dbusmock_systemd, monkeypatch):
    vm, disks, export_dir = exported
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    name = "dead-" + uuid.uuid4().hex[:6]
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "failed")
    config = config_for()
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir,
                                   integration(config, daemon_mode=True, instance=name))
    assert result["mode"] == "builtin-fallback"
    assert result["fallback_reason"] == f"hyper2kvm@{name}.service is failed"
    assert ("warning", f"hyper2kvm@{name}.service is failed: converting with the built-in "
                       "converter instead") in ctx.lines
    assert len(result["disks"]) == 2 and all(Path(d["path"]).is_file() for d in result["disks"])
    assert not (tmp_path / "watch").exists()


async def test_taken_name_is_refused_before_any_conversion(config_for, exported, tmp_path,
                                                          test_driver):
    vm, disks, export_dir = exported
    test_driver.defineXML(f"<domain type='test'><name>{vm.name}</name><memory>65536</memory>"
                          "<os><type>hvm</type></os></domain>")
    config = config_for()
    ctx = fake_job_context(config)
    with pytest.raises(AlreadyExists, match=f"a domain named '{vm.name}' already exists"):
        await run_integration(ctx, vm, disks, export_dir,
                              integration(config, auto_convert=True, import_to_kvm=True))
    assert not (tmp_path / "out").exists() and ctx.total == 0


async def test_missing_network_is_refused_before_the_hand_off(config_for, exported, tmp_path,
                                                              test_driver):
    vm, disks, export_dir = exported
    config = config_for()
    with pytest.raises(NotFound, match="network 'lan' does not exist at test:///default"):
        await run_integration(fake_job_context(config), vm, disks, export_dir, integration(
            config, daemon_mode=True, import_to_kvm=True, network="lan"))
    assert not (tmp_path / "watch").exists()


async def test_daemon_disabled_in_config_falls_back_without_asking_systemd(
        config_for, exported, tmp_path, monkeypatch):
    vm, disks, export_dir = exported
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    config = config_for(hyper2kvm={"daemon_enabled": False})
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir,
                                   integration(config, daemon_mode=True, instance="vsphere"))
    assert result["mode"] == "builtin-fallback"
    assert result["fallback_reason"] == ("hyper2kvm@vsphere.service is disabled in the config "
                                         "(hyper2kvm.daemon_enabled: false)")
    assert not (tmp_path / "watch").exists()


async def test_daemon_mode_ends_with_the_real_hyper2kvms_error(config_for, tmp_path,
                                                               dbusmock_systemd, monkeypatch):
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(4 << 20))
    vmdk = tmp_path / "truncated.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk))
    os.truncate(vmdk, 1_000_000)  # an export cut short: qemu-img fails reading it
    disk = ExportedDisk(path=vmdk, format="vmdk", capacity_bytes=4 << 20,
                        file_bytes=1_000_000, sha256="", boot_order=0, key="disk-2000")
    vm = VMInfo(identifier="vm-9", name="broken-" + uuid.uuid4().hex[:6], provider="vsphere")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    name = "fails-" + uuid.uuid4().hex[:6]
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", "active")
    config = config_for(hyper2kvm={"job_timeout": "60s"})

    async def hyper2kvm_that_fails() -> None:
        with pytest.raises(AssertionError, match="Pipeline failed"):
            await run_real_hyper2kvm_on_first_manifest(tmp_path / "watch" / name)

    daemon = asyncio.create_task(hyper2kvm_that_fails())
    with pytest.raises(Failed, match=r"hyper2kvm failed \(.*report.json\): stage convert: "):
        await run_integration(fake_job_context(config), vm, [disk], tmp_path,
                              integration(config, daemon_mode=True, instance=name))
    await daemon
