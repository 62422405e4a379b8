"""The "import" job kind: the spec's /import-to-kvm body, validated, then defined in libvirt."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from hypersdk.service.errors import AlreadyExists, InvalidArgument
from hypersdk.service.job_kinds import get_kind
from hypersdk.service.jobs.convert_job import ConvertKind
from hypersdk.service.jobs.import_job import ImportKind
from tests.pipeline_formats.helpers import make_image, small_ovf_text
from tests.vsphere.fake_context import run_job

from .conftest import fake_job_context, qemu_img


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "16M")
    return path


def body(disk, **extra) -> dict:
    values = {"vm_name": "vm-" + uuid.uuid4().hex[:8], "disk_path": str(disk), "memory_mb": 512,
              "vcpus": 2, "network": "default", "autostart": True}
    values.update(extra)
    return values


def test_registered_with_its_polkit_action():
    kind = get_kind("import")
    assert isinstance(kind, ImportKind)
    assert (kind.operation, kind.polkit_action) == ("import", "org.hypersdk.HyperSDK1.import")


def test_spec_body_is_normalised(config_for, disk):
    submit = SimpleNamespace(config=config_for(), providers=None)
    result = ImportKind().validate(body(disk, autostart=True), submit)
    assert result["disk_paths"] == [str(disk)]
    assert (result["firmware"], result["os_type"], result["start"], result["uuid"]) == (
        "bios", "unknown", False, "")
    assert result["autostart"] is True


def test_network_defaults_to_the_config(config_for, disk):
    submit = SimpleNamespace(config=config_for(libvirt={"network": "lan"}), providers=None)
    definition = body(disk)
    del definition["network"]
    assert ImportKind().validate(definition, submit)["network"] == "lan"


@pytest.mark.parametrize("change, field, rule", [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"memory_mb": "512"}, "memory_mb", "integer"),
    ({"memory_mb": True}, "memory_mb", "integer"),
    ({"memory_mb": 0}, "memory_mb", ">= 1"),
    ({"vcpus": 0}, "vcpus", ">= 1"),
    ({"autostart": "yes"}, "autostart", "true or false"),
    ({"vm_name": "a/b"}, "vm_name", "without '/'"),
    ({"disk_path": "relative.qcow2"}, "disk_path", "absolute"),
    ({"disk_path": "/nonexistent/disk.qcow2"}, "disk_path", "outside the source roots"),
    ({"disk_paths": ["/x"]}, "disk_path", "exactly one of"),
    ({"firmware": "coreboot"}, "firmware", "one of bios, uefi"),
    ({"os_type": "beos"}, "os_type", "one of linux"),
    ({"uuid": "nope"}, "uuid", "a UUID"),
])
def test_bad_fields_are_named(config_for, disk, change, field, rule):
    submit = SimpleNamespace(config=config_for(), providers=None)
    with pytest.raises(InvalidArgument) as info:
        ImportKind().validate(body(disk, **change), submit)
    assert info.value.field == field and rule in info.value.rule


def test_a_missing_disk_inside_the_roots_is_named(config_for, disk):
    submit = SimpleNamespace(config=config_for(), providers=None)
    with pytest.raises(InvalidArgument) as info:
        ImportKind().validate(body(disk, disk_path=str(disk.parent / "gone.qcow2")), submit)
    assert info.value.field == "disk_path" and "no such file or directory" in info.value.rule


def test_missing_required_field(config_for, disk):
    definition = body(disk)
    del definition["memory_mb"]
    with pytest.raises(InvalidArgument, match="memory_mb: required"):
        ImportKind().validate(definition, SimpleNamespace(config=config_for(), providers=None))


async def test_run_defines_the_domain_in_the_configured_uri(config_for, disk, tmp_path,
                                                           test_driver):
    raw = tmp_path / "data.raw"
    qemu_img("create", "-f", "raw", str(raw), "8M")
    config = config_for()
    definition = body(disk, os_type="linux", start=True)
    del definition["disk_path"]
    definition["disk_paths"] = [str(disk), str(raw)]
    kind = ImportKind()
    ctx = fake_job_context(config, kind.validate(definition, SimpleNamespace(config=config)))
    result = await kind.run(ctx)
    assert result["domain"] == definition["vm_name"] and result["uri"] == "test:///default"
    assert result["autostart"] and result["started"]
    domain = test_driver.lookupByName(definition["vm_name"])
    xml = domain.XMLDesc()
    assert "type='qcow2'" in xml and "type='raw'" in xml  # formats probed from the files
    assert domain.autostart() == 1 and domain.isActive() == 1
    assert ctx.stages == ["import"]
    # a second import of the same name is refused, the first left as it was
    with pytest.raises(AlreadyExists):
        await kind.run(fake_job_context(config, ctx.definition))


async def test_run_refuses_an_unconverted_image(config_for, tmp_path, test_driver):
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-f", "vmdk", str(vmdk), "8M")
    config = config_for()
    kind = ImportKind()
    ctx = fake_job_context(config, kind.validate(body(vmdk), SimpleNamespace(config=config)))
    with pytest.raises(InvalidArgument, match="is a vmdk image; convert it to qcow2 or raw first"):
        await kind.run(ctx)


def one_disk_ovf(directory: Path) -> tuple[Path, Path]:
    """The sample OVF (web01) with only its first disk, and that disk's raw reference."""
    text = small_ovf_text()
    text = re.sub(r"\s*<File [^>]*file2[^>]*/>", "", text)
    text = re.sub(r"\s*<Disk [^>]*vmdisk2[^>]*/>", "", text)
    text = re.sub(r"\s*<Item>(?:(?!</Item>).)*vmdisk2.*?</Item>", "", text, flags=re.DOTALL)
    assert "disk2" not in text
    raw, vmdk = make_image(directory, "vmdk", name="web01-disk1", subformat="streamOptimized")
    (directory / "web01.ovf").write_text(text)
    return directory / "web01.ovf", raw


async def test_spec_4_2_convert_then_4_3_import_of_a_one_disk_vm(config_for, tmp_path,
                                                                  test_driver):
    """The spec's /convert body, then its /import-to-kvm body naming <output_path>/disk.qcow2."""
    ovf, raw = one_disk_ovf(tmp_path)
    config = config_for()
    submit = SimpleNamespace(config=config, providers=None)
    convert = ConvertKind()
    converted = await run_job(convert, fake_job_context(config, convert.validate({
        "source_path": str(ovf), "output_path": str(tmp_path / "kvm" / "web01"),
        "conversion_options": {"format": "qcow2", "compression": True}}, submit)))
    disk = tmp_path / "kvm" / "web01" / "disk.qcow2"
    assert [d["path"] for d in converted["disks"]] == [str(disk)]
    qemu_img("compare", "-q", str(raw), str(disk))
    importer = ImportKind()
    definition = {"vm_name": "vm-" + uuid.uuid4().hex[:8], "disk_path": str(disk),
                  "memory_mb": 4096, "vcpus": 2, "network": "default", "autostart": True}
    result = await run_job(importer, fake_job_context(config, importer.validate(definition,
                                                                                 submit)))
    assert result["domain"] == definition["vm_name"]
    assert str(disk) in test_driver.lookupByName(definition["vm_name"]).XMLDesc()
