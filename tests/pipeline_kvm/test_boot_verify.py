"""verify_boot and guest_conversion as a job asks for them: their checks at submit
time, and boot verification against the real libvirtd with the boot-sector disk
(whose line on COM1 stands in for a login prompt; the real guest is in
test_guest_conversion.py)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hypersdk.service.errors import Failed, InvalidArgument, Unavailable
from hypersdk.service.kvm.boot_verify import DEFAULT_EXPECT, DEFAULT_TIMEOUT
from hypersdk.service.kvm.domain_xml import DomainDisk, DomainSpec
from hypersdk.service.kvm.guest_conversion import _Run, check_virtio_win, convert_guest
from hypersdk.service.jobs.handoff import validate_integration
from hypersdk.service.jobs.import_job import ImportKind
from hypersdk.service.kvm.kvm_landing import Landing, land
from tests.support.bootdisk import BOOT_LINE, write_boot_disk
from tests.vsphere.fake_context import FakeSubmitContext

from .conftest import fake_job_context

DIRECT = {"enabled": True, "auto_convert": True, "import_to_kvm": True}


def test_verify_boot_true_takes_the_defaults(config_for):
    block = validate_integration({**DIRECT, "verify_boot": True, "guest_conversion": True},
                                 config_for())
    assert block["verify_boot"] == {"timeout": DEFAULT_TIMEOUT, "expect": DEFAULT_EXPECT}
    assert block["guest_conversion"] is True
    assert validate_integration(DIRECT, config_for())["verify_boot"] is None


def test_verify_boot_object_is_normalised(config_for):
    block = validate_integration({**DIRECT, "verify_boot": {"timeout": "90s", "expect": "ok"}},
                                 config_for())
    assert block["verify_boot"] == {"timeout": 90.0, "expect": "ok"}


@pytest.mark.parametrize("value, field, rule", [
    ({"timeout": "soon"}, "verify_boot.timeout", "a duration > 0"),
    ({"timeout": 0}, "verify_boot.timeout", "a duration > 0"),
    ({"expect": ""}, "verify_boot.expect", "a non-empty string"),
    ({"wait": "1m"}, "verify_boot.wait", "unknown field"),
    ("yes", "verify_boot", "true, false or an object"),
])
def test_a_bad_verify_boot_names_its_field(config_for, value, field, rule):
    with pytest.raises(InvalidArgument) as info:
        validate_integration({**DIRECT, "verify_boot": value}, config_for())
    assert info.value.field == f"hyper2kvm_integration.{field}"
    assert rule in str(info.value)


@pytest.mark.parametrize("key, value", [("verify_boot", True), ("guest_conversion", True)])
def test_conversion_and_verification_need_an_import(config_for, key, value):
    with pytest.raises(InvalidArgument, match=rf"hyper2kvm_integration.{key}: needs "
                                              "import_to_kvm: true"):
        validate_integration({"enabled": True, "auto_convert": True, key: value}, config_for())


def test_the_import_job_takes_both(config_for, tmp_path):
    disk = write_boot_disk(tmp_path / "boot.raw")
    submit = FakeSubmitContext(config_for(), None)
    body = {"vm_name": "vm", "disk_path": str(disk), "memory_mb": 64}
    definition = ImportKind().validate({**body, "guest_conversion": True,
                                        "verify_boot": {"expect": "ok"}}, submit)
    assert definition["guest_conversion"] is True
    assert definition["verify_boot"] == {"timeout": DEFAULT_TIMEOUT, "expect": "ok"}
    with pytest.raises(InvalidArgument, match="^guest_conversion: true or false$"):
        ImportKind().validate({**body, "guest_conversion": "yes"}, submit)
    with pytest.raises(InvalidArgument, match=r"^verify_boot\.timeout: a duration"):
        ImportKind().validate({**body, "verify_boot": {"timeout": -1}}, submit)


def test_a_windows_guest_without_virtio_win_is_a_clear_error(config_for, tmp_path):
    with pytest.raises(Unavailable, match="set guest_conversion.virtio_win in the config"):
        check_virtio_win("windows", config_for())
    missing = tmp_path / "virtio-win.iso"
    with pytest.raises(Unavailable, match=rf"guest_conversion.virtio_win: {missing} does "
                                          "not exist"):
        check_virtio_win("windows", config_for(guest_conversion={"virtio_win": str(missing)}))
    check_virtio_win("linux", config_for())  # Linux guests need nothing from outside


async def test_conversion_of_a_windows_guest_stops_before_it_starts(config_for, tmp_path):
    spec = DomainSpec(name="win", memory_mb=64, vcpus=1, os_family="windows",
                      disks=[DomainDisk(write_boot_disk(tmp_path / "boot.raw"), "raw")])
    ctx = fake_job_context(config_for())
    with pytest.raises(Unavailable, match="virtio-win"):
        await convert_guest(ctx, spec)
    assert ctx.stages == [] and ctx.total == 0


def boot_spec(guest_dir: Path) -> DomainSpec:
    return DomainSpec(name="hypersdk-verify-" + uuid.uuid4().hex[:6], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(write_boot_disk(guest_dir / "boot.raw"), "raw")],
                      serial_log=guest_dir / "serial.log")


async def test_a_guest_that_shows_the_text_is_verified(libvirt_system, guest_dir, config_for):
    conn, names = libvirt_system
    spec = boot_spec(guest_dir)
    names.append(spec.name)
    ctx = fake_job_context(config_for(libvirt={"uri": "qemu:///system"}))
    check = {"timeout": 60.0, "expect": BOOT_LINE.decode()}
    result = await land(ctx, spec, Landing(verify_boot=check))
    assert result["started"] is True  # verify_boot starts the domain
    verification = result["verification"]
    assert verification["verified"] is True and verification["method"] == "console"
    assert verification["seen"][-1].endswith(BOOT_LINE.decode())
    assert verification["at"].endswith("Z") and verification["after_seconds"] < 60
    assert ctx.stages == ["verify boot"]
    assert conn.lookupByName(spec.name).isActive()


async def test_a_guest_that_does_not_is_failed_with_its_console_and_removed(
        libvirt_system, guest_dir, config_for):
    conn, names = libvirt_system
    spec = boot_spec(guest_dir)
    names.append(spec.name)
    ctx = fake_job_context(config_for(libvirt={"uri": "qemu:///system"}))
    with pytest.raises(Failed, match=r"^boot not verified: the guest did not show 'login:' "
                                     r"on its serial console within 5 s, nor did a guest "
                                     r"agent answer \(last console line: "):
        await land(ctx, spec, Landing(verify_boot={"timeout": 5.0, "expect": "login:"}))
    errors = [message for level, message in ctx.lines if level == "error"]
    assert errors[0].startswith("boot not verified: ")
    assert BOOT_LINE.decode() in errors[-1] and errors[-1].startswith("console: ")
    assert spec.name not in [domain.name() for domain in conn.listAllDomains()]


def test_the_tools_lines_go_to_the_log_and_its_steps_to_the_progress(config_for):
    ctx = fake_job_context(config_for())
    run = _Run(ctx, 1000)
    # lines virt-v2v-in-place 2.2 printed converting the test guest (stdout)
    for line in ["[   0.0] Setting up the source: -i libvirtxml /tmp/domain.xml",
                 "[   1.0] Opening the source", "[  25.9] Inspecting the source",
                 "[  43.5] Converting 12.15 to run on KVM",
                 "virt-v2v-in-place: warning: could not determine a way to update the "
                 "configuration of Grub2",
                 "virt-v2v-in-place: This guest has virtio drivers installed."]:
        run.status(line)
    assert run.guest == "12.15" and ctx.done == 300
    assert ctx.lines[0] == ("info", "virt-v2v-in-place: [   0.0] Setting up the source: "
                                    "-i libvirtxml /tmp/domain.xml")
    assert ctx.lines[-2][0] == "warning" and ctx.lines[-2][1].count("virt-v2v-in-place") == 1
    assert ctx.lines[-1] == ("info", "virt-v2v-in-place: This guest has virtio drivers "
                                     "installed.")
    run.status("[ 146.1] Finishing off")
    assert ctx.done == 1000
