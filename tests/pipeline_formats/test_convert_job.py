"""The "convert" JobKind: validation of the /convert body, and runs over image/OVF/OVA."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from hypersdk.service.errors import Failed, InvalidArgument
from hypersdk.service.job_kinds import get_kind
from hypersdk.service.jobs.convert_job import ConvertKind

from tests.vsphere.fake_context import FakeJobContext, run_job

from .conftest import roots_config
from .helpers import DISK_SIZE, images_equal, make_image, small_ovf_text
from .helpers import manifest



def job_context(definition: dict, tmp_path: Path) -> FakeJobContext:
    return FakeJobContext(definition, roots_config(tmp_path), None)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".hypersdk"))


def make_ovf_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """web01.ovf + two streamOptimized disks + a .mf, like an OVF export; returns refs."""
    src = tmp_path / "export"
    src.mkdir()
    refs = []
    for n in (1, 2):
        raw, vmdk = make_image(tmp_path, "vmdk", name=f"web01-disk{n}",
                               subformat="streamOptimized", seed=n)
        vmdk.rename(src / vmdk.name)
        refs.append(raw)
    (src / "web01.ovf").write_text(small_ovf_text())
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
    (src / "web01.mf").write_bytes(manifest(files))
    return src / "web01.ovf", refs


def test_registered_with_its_polkit_action():
    kind = get_kind("convert")
    assert isinstance(kind, ConvertKind)
    assert kind.operation == "convert"
    assert kind.polkit_action == "org.hypersdk.HyperSDK1.convert"


def test_validate_normalises_and_applies_defaults(tmp_path, submit_ctx):
    _raw, image = make_image(tmp_path, "raw")
    definition = ConvertKind().validate(
        {"source_path": str(image), "output_path": str(tmp_path / "out")}, submit_ctx)
    assert definition["conversion_options"] == {"format": "qcow2", "compression": False}


@pytest.mark.parametrize("change,field,rule", [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"source_path": "relative/disk.raw"}, "source_path", "is not an absolute path"),
    ({"output_path": "/tmp/a/../b"}, "output_path", "must not contain '..'"),
    ({"source_path": "/nonexistent/disk.raw"}, "source_path", "is outside the source roots"),
    ({"output_path": "/etc/cron.d"}, "output_path", "is outside the output roots"),
    ({"conversion_options": {"format": "vdi"}}, "conversion_options.format",
     "one of qcow2, raw"),
    ({"conversion_options": {"source_format": "tar"}}, "conversion_options.source_format",
     "one of raw"),
    ({"conversion_options": []}, "conversion_options", "must be a JSON object"),
    ({"conversion_options": {"speed": 1}}, "conversion_options.speed", "unknown field"),
    ({"conversion_options": {"format": "raw", "compression": True}},
     "conversion_options.compression", "only qcow2"),
    ({"conversion_options": {"compression": "yes"}}, "conversion_options.compression",
     "true or false"),
])
def test_validate_refuses_bad_definitions(tmp_path, submit_ctx, change, field, rule):
    _raw, image = make_image(tmp_path, "raw")
    definition = {"source_path": str(image), "output_path": str(tmp_path / "out"), **change}
    with pytest.raises(InvalidArgument) as err:
        ConvertKind().validate(definition, submit_ctx)
    assert err.value.field == field
    assert rule in str(err.value)


async def test_run_on_a_single_image(tmp_path, submit_ctx):
    raw, image = make_image(tmp_path, "vhdx")
    kind = ConvertKind()
    definition = kind.validate({"source_path": str(image), "output_path": str(tmp_path / "out"),
                                "conversion_options": {"format": "raw"}}, submit_ctx)
    ctx = job_context(definition, tmp_path)
    result = await run_job(kind, ctx)
    [disk] = result["disks"]
    assert disk["path"] == str(tmp_path / "out" / "disk.raw") and disk["format"] == "raw"
    assert images_equal(raw, Path(disk["path"]))
    assert result["ovf"] is None
    assert ctx.total == DISK_SIZE and ctx.done_history[-1] == DISK_SIZE
    assert ctx.owned == [] and leftovers(tmp_path / "out") == []


async def test_run_on_an_ovf_converts_every_disk(tmp_path, submit_ctx):
    ovf, refs = make_ovf_dir(tmp_path)
    kind = ConvertKind()
    definition = kind.validate({"source_path": str(ovf), "output_path": str(tmp_path / "kvm")},
                               submit_ctx)
    ctx = job_context(definition, tmp_path)
    result = await run_job(kind, ctx)
    paths = [Path(d["path"]) for d in result["disks"]]
    assert [p.name for p in paths] == ["web01-disk1.qcow2", "web01-disk2.qcow2"]
    assert all(images_equal(ref, p) for ref, p in zip(refs, paths))
    assert result["ovf"]["name"] == "web01" and result["ovf"]["memory_mb"] == 512
    assert ctx.total == 2 * DISK_SIZE
    assert ctx.done_history[-1] == 2 * DISK_SIZE
    assert ctx.done_history == sorted(ctx.done_history)
    assert any("manifest: 3 files checked" in line for line in ctx.messages)


async def test_run_on_an_ova_extracts_then_converts(tmp_path, submit_ctx):
    ovf, refs = make_ovf_dir(tmp_path)
    ova = tmp_path / "web01.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("web01.ovf", "web01.mf", "web01-disk1.vmdk", "web01-disk2.vmdk"):
            tar.add(ovf.parent / name, arcname=name)
    shutil.rmtree(ovf.parent)
    kind = ConvertKind()
    out = tmp_path / "kvm"
    ctx = job_context(kind.validate({"source_path": str(ova), "output_path": str(out)},
                                    submit_ctx), tmp_path)
    result = await run_job(kind, ctx)
    assert sorted(p.name for p in out.iterdir()) == ["web01-disk1.qcow2", "web01-disk2.qcow2"]
    assert images_equal(refs[1], out / "web01-disk2.qcow2")
    assert result["ovf"]["disks"][0]["boot_order"] == 1
    assert ctx.stages == ["extract", "convert"]
    assert ctx.total == ova.stat().st_size + 2 * DISK_SIZE
    assert ctx.done_history == sorted(ctx.done_history)
    assert ctx.done_history[-1] == ctx.total
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "scratch dir left behind"


async def test_truncated_second_disk_fails_before_any_conversion(tmp_path, submit_ctx):
    ovf, _refs = make_ovf_dir(tmp_path)
    (ovf.parent / "web01.mf").unlink()
    disk2 = ovf.parent / "web01-disk2.vmdk"
    with open(disk2, "r+b") as fh:
        fh.truncate(disk2.stat().st_size // 2 + 100)
    kind = ConvertKind()
    out = tmp_path / "kvm"
    ctx = job_context(kind.validate({"source_path": str(ovf), "output_path": str(out)},
                                    submit_ctx), tmp_path)
    with pytest.raises(Failed, match="web01-disk2.vmdk: the VMDK is incomplete"):
        await run_job(kind, ctx)
    assert not any("converting" in line for line in ctx.messages)
    assert not out.exists()  # the job made it, and removed it again


async def test_corrupt_second_disk_removes_the_first_one_landed(tmp_path, submit_ctx):
    ovf, _refs = make_ovf_dir(tmp_path)
    (ovf.parent / "web01.mf").unlink()
    with open(ovf.parent / "web01-disk2.vmdk", "r+b") as fh:
        fh.seek(65536 + 12 + 100)  # inside the first compressed grain
        fh.write(b"\xff" * 64)
    kind = ConvertKind()
    out = tmp_path / "kvm"
    ctx = job_context(kind.validate({"source_path": str(ovf), "output_path": str(out)},
                                    submit_ctx), tmp_path)
    with pytest.raises(Failed, match="web01-disk2.vmdk: grain at sector 0 does not inflate"):
        await run_job(kind, ctx)
    # the first disk had landed; the failed job removed it, its staging and the directory
    assert "converting web01-disk2.vmdk -> web01-disk2.qcow2" in ctx.messages
    assert not out.exists() and ctx.owned == []
