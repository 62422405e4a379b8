"""An OVA written by our own export job (jobs/export.py) read back through the ova
provider: the export job takes an OVA in and puts an OVA out, the disks stay identical."""
from __future__ import annotations

import subprocess

from hypersdk.service.config import parse_config
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.registry import ProviderRegistry

from ..support.fake_sink import FakeExportSink
from ..vsphere.fake_context import job_context, run_job
from .conftest import write_package


async def test_export_job_output_round_trips_through_the_ova_provider(tmp_path):
    imports, exports = tmp_path / "imports", tmp_path / "exports"
    imports.mkdir()
    exports.mkdir()
    package = write_package(imports, "app01")
    config = parse_config({"ova": {"import_dirs": [str(imports), str(exports)]},
                           "export": {"base_path": str(exports)}}, "test")
    registry = ProviderRegistry(config)
    kind = ExportKind()
    ctx = job_context(kind, {"vm_identifier": str(package.ova), "provider": "ova",
                             "export_method": "ova", "export_path": "again"}, config, registry)
    result = await run_job(kind, ctx)

    produced = exports / "again" / "app01.ova"
    assert produced.is_file() and str(produced) in str(result)
    provider = await registry.get("ova")
    vm, disks = await provider.export_disks(str(produced), tmp_path / "back", ExportOptions(),
                                            FakeExportSink())
    assert (vm.name, vm.cpus, vm.memory_mb, vm.firmware) == ("app01", 2, 2048, "uefi")
    for disk, raw in zip(disks, package.raws, strict=True):
        assert subprocess.run(["qemu-img", "compare", "-q", str(disk.path), str(raw)]).returncode == 0
