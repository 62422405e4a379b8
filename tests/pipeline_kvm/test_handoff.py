"""The hyper2kvm_integration block: export-only, built-in Direct Pipeline, daemon hand-off."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from hypersdk.service.errors import AlreadyExists, Failed, InvalidArgument, NotFound
from hypersdk.service.jobs.handoff import (DEFAULT_MEMORY_MB, run_integration,
                                          validate_integration)
from hypersdk.service.kvm.domain_xml import is_uuid
from hypersdk.service.jobs.hyper2kvm import follow
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
    ({"enabled": True, "auto_convert": True, "output_dir": "/etc"},
     "hyper2kvm_integration.output_dir", "outside the paths.outputs roots"),
    ({"enabled": True, "daemon_mode": True, "output_dir": "/var/lib/libvirt/images"},
     "hyper2kvm_integration.output_dir", "only for the Direct Pipeline"),
    ({"enabled": True, "auto_convert": True, "network_map": {"VM Network": {"nat": "x"}}},
     "hyper2kvm_integration.network_map.VM Network.nat", "unknown field"),
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


async def test_a_source_id_that_is_no_uuid_and_no_memory_size_get_libvirts_and_a_default(
        config_for, exported, test_driver):
    """Every cloud provider's VM id is no UUID (an EC2 instance id here), and a VM may not
    report its memory: the domain gets a UUID libvirt picks and the default memory."""
    vm, disks, export_dir = exported
    vm.uuid, vm.memory_mb = "i-0123456789abcdef0", 0
    config = config_for()
    ctx = fake_job_context(config)
    await run_integration(ctx, vm, disks, export_dir, integration(
        config, auto_convert=True, import_to_kvm=True, network="default"))
    domain = test_driver.lookupByName(vm.name)
    assert is_uuid(domain.UUIDString())
    assert domain.maxMemory() == DEFAULT_MEMORY_MB * 1024  # KiB
    warnings = [message for level, message in ctx.lines if level == "warning"]
    assert "the source id 'i-0123456789abcdef0' is not a UUID; libvirt assigns a new one" \
        in warnings
    assert f"the VM reports no memory size; giving it {DEFAULT_MEMORY_MB} MiB" in warnings


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


def active_instance(dbusmock_systemd, monkeypatch, prefix: str, state: str = "active") -> str:
    """A fresh instance name whose hyper2kvm@ unit is in `state` in the dbusmock systemd."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    dbusmock_systemd.add_unit(f"hyper2kvm@{name}.service", state)
    return name


def queued(tmp_path: Path, name: str) -> list[str]:
    """The manifests waiting in the instance's to_be_processed/ (not the job's staging)."""
    queue = tmp_path / "watch" / name / "to_be_processed"
    return sorted(p.name for p in queue.glob("*.json")) if queue.is_dir() else []


async def test_daemon_mode_real_daemon_fake_guest_fix_converts_and_imports(
        config_for, exported, tmp_path, dbusmock_systemd, monkeypatch, test_driver,
        hyper2kvm_daemon):
    vm, disks, export_dir = exported
    name = active_instance(dbusmock_systemd, monkeypatch, "vsphere")
    daemon = hyper2kvm_daemon(tmp_path / "watch" / name, tmp_path / "out", fake_guest_fix=True)
    config = config_for(hyper2kvm={"job_timeout": "120s"})
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir, integration(
        config, daemon_mode=True, instance=name, import_to_kvm=True, guest_conversion=True))
    ctx.succeed()
    assert result["mode"] == "daemon" and result["unit"] == f"hyper2kvm@{name}.service"
    assert len(result["manifests"]) == 2 and queued(tmp_path, name) == []
    for disk, source in zip(result["disks"], [disks[1], disks[0]]):  # boot disk first
        image, manifest = Path(disk["path"]), Path(disk["manifest"])
        assert image.parent.name == manifest.stem and image.name == "disk.qcow2"
        assert image.parent.parent.parent == tmp_path / "out"  # <output_dir>/<date>/<name>/
        qemu_img("compare", "-q", str(source.path), str(image))
        handed = json.loads(next((tmp_path / "watch" / name / "processed").glob(
            f"*/{manifest.name}")).read_text())
        assert handed["pipeline"]["fix"] == {"enabled": True}  # guest_conversion asked for it
        assert handed["metadata"]["job_id"] == ctx.job_id
        assert f"Manifest completed: {manifest.stem}" in daemon.text()
    assert "FAKE guest fix" in daemon.text()
    assert ctx.stages == ["handoff", "waiting for hyper2kvm", "import"]
    assert ctx.done == ctx.total == sum(d.capacity_bytes for d in disks)
    assert all(f"hyper2kvm converted {Path(m).name}" in ctx.text() for m in result["manifests"])
    assert test_driver.lookupByName(vm.name).UUIDString() == vm.uuid


async def test_a_real_daemon_that_fails_fails_the_job_with_its_reason(
        config_for, tmp_path, dbusmock_systemd, monkeypatch, hyper2kvm_daemon):
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(4 << 20))
    vmdk = tmp_path / "truncated.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk))
    os.truncate(vmdk, 1_000_000)  # an export cut short
    disk = ExportedDisk(path=vmdk, format="vmdk", capacity_bytes=4 << 20,
                        file_bytes=1_000_000, sha256="", boot_order=0, key="disk-2000")
    vm = VMInfo(identifier="vm-9", name="broken-" + uuid.uuid4().hex[:6], provider="vsphere")
    name = active_instance(dbusmock_systemd, monkeypatch, "fails")
    hyper2kvm_daemon(tmp_path / "watch" / name, tmp_path / "out", fake_guest_fix=False)
    config = config_for(hyper2kvm={"job_timeout": "120s"})
    ctx = fake_job_context(config)
    with pytest.raises(Failed) as info:
        await run_integration(ctx, vm, [disk], tmp_path,
                              integration(config, daemon_mode=True, instance=name))
    ctx.fail()
    error_file = next((tmp_path / "watch" / name / "failed").glob("*/*.json.error.json"))
    reason = json.loads(error_file.read_text())["error"].strip()
    manifest = error_file.name.removesuffix(".error.json")
    assert str(info.value) == f"hyper2kvm failed on {manifest}: {reason} ({error_file})"
    assert reason and "Traceback" not in reason


async def test_daemon_mode_times_out_saying_the_daemon_never_took_it(
        config_for, exported, dbusmock_systemd, monkeypatch, tmp_path):
    vm, disks, export_dir = exported
    name = active_instance(dbusmock_systemd, monkeypatch, "idle")
    config = config_for(hyper2kvm={"job_timeout": "0.2s"})
    ctx = fake_job_context(config)
    with pytest.raises(Failed, match=r"did not finish within 0.2 s \(hyper2kvm.job_timeout\): "
                                     r".*-disk-2000-.*\.json still waiting in to_be_processed/"):
        await run_integration(ctx, vm, disks, export_dir,
                              integration(config, daemon_mode=True, instance=name))
    assert len(queued(tmp_path, name)) == 2
    ctx.fail()  # what the engine does with a failed job: the manifests are withdrawn
    assert queued(tmp_path, name) == []


async def test_inactive_unit_without_auto_convert_hands_off_and_converts_nothing(
        config_for, exported, tmp_path, dbusmock_systemd, monkeypatch, hyper2kvm_daemon):
    vm, disks, export_dir = exported
    name = active_instance(dbusmock_systemd, monkeypatch, "later", "inactive")
    config = config_for(hyper2kvm={"job_timeout": "120s"})
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir,
                                   integration(config, daemon_mode=True, instance=name))
    ctx.succeed()
    assert result["mode"] == "handed-off"
    assert result["daemon"] == f"hyper2kvm@{name}.service is inactive"
    assert queued(tmp_path, name) == sorted(Path(m).name for m in result["manifests"])
    assert any(level == "warning" and f"hyper2kvm@{name}.service is inactive: the manifests "
               "wait in" in text and "nothing is converted here (auto_convert: false)" in text
               for level, text in ctx.lines)
    assert not (tmp_path / "out").exists() and ctx.stages == ["handoff"]
    # the daemon, once started, finds them where they were left
    daemon = hyper2kvm_daemon(tmp_path / "watch" / name, tmp_path / "out", fake_guest_fix=True)
    base = tmp_path / "watch" / name
    images = await follow(base, tmp_path / "out", [Path(m).name for m in result["manifests"]],
                          poll_interval=0.1, timeout=120, log=lambda _: None,
                          on_done=lambda *_: None)
    assert len(images) == 2, daemon.text()[-2000:]


async def test_inactive_unit_with_auto_convert_falls_back_to_builtin(
        config_for, exported, tmp_path, dbusmock_systemd, monkeypatch):
    vm, disks, export_dir = exported
    name = active_instance(dbusmock_systemd, monkeypatch, "dead", "failed")
    config = config_for()
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir, integration(
        config, daemon_mode=True, auto_convert=True, instance=name))
    assert result["mode"] == "builtin-fallback"
    assert result["fallback_reason"] == f"hyper2kvm@{name}.service is failed"
    assert ("warning", f"hyper2kvm@{name}.service is failed: converting with the built-in "
                       "converter instead (auto_convert: true)") in ctx.lines
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


@pytest.mark.parametrize("auto_convert, mode", [(True, "builtin-fallback"),
                                                (False, "handed-off")])
async def test_daemon_disabled_in_config_never_asks_systemd(config_for, exported, tmp_path,
                                                            monkeypatch, auto_convert, mode):
    vm, disks, export_dir = exported
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    config = config_for(hyper2kvm={"daemon_enabled": False})
    ctx = fake_job_context(config)
    result = await run_integration(ctx, vm, disks, export_dir, integration(
        config, daemon_mode=True, auto_convert=auto_convert, instance="vsphere"))
    reason = ("hyper2kvm@vsphere.service is disabled in the config "
              "(hyper2kvm.daemon_enabled: false)")
    assert result["mode"] == mode
    assert result.get("fallback_reason", result.get("daemon")) == reason
    assert (tmp_path / "out").exists() == auto_convert
    assert len(queued(tmp_path, "vsphere")) == (0 if auto_convert else 2)
