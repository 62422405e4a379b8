"""The spec's Pattern 2 (Daemon Queue) end to end with the real hyper2kvm 0.2.1 daemon.

Three VMs in the vSphere simulator, each with a disk of its own random content; three
export jobs with the spec's `hyper2kvm_integration` (daemon_mode, auto_convert: false)
run at once; the real daemon, started with our unit's command line on a temporary
watch directory, takes their manifests and converts them. Each job completes with its
result pointing at the daemon's qcow2, which holds exactly the VM's disk. The unit's
state comes from python-dbusmock's systemd (a named fake: there is no systemd here);
the daemon's NBD guest-fix stage is faked where the kernel has no nbd
(tests/support/hyper2kvm_daemon.py).
"""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.bootdisk import write_boot_disk
from tests.vcsim.harness import Simulator, prepare_image_vm
from tests.vsphere.fake_context import job_context, run_job

from .conftest import qemu_img

pytestmark = pytest.mark.slow

SOURCE_VMS = ["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0"]
DISK_SIZE = 4 << 20


def random_disk(path: Path) -> Path:
    """A boot sector, 1 MiB of random bytes at 1 MiB, the rest a hole."""
    write_boot_disk(path, DISK_SIZE)
    with open(path, "r+b") as handle:
        handle.seek(1 << 20)
        handle.write(os.urandom(1 << 20))
    return path


async def test_pattern2_real_daemon_fake_guest_fix_converts_every_job(
        tmp_path, dbusmock_systemd, monkeypatch, hyper2kvm_daemon):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbusmock_systemd.address)
    instance = "vsphere-" + uuid.uuid4().hex[:6]
    dbusmock_systemd.add_unit(f"hyper2kvm@{instance}.service", "active")
    watch, out = tmp_path / "watch", tmp_path / "images"
    daemon = hyper2kvm_daemon(watch / instance, out, fake_guest_fix=True)
    (tmp_path / "exports").mkdir()
    sources: dict[str, Path] = {}
    with Simulator() as sim:
        for index, source_vm in enumerate(SOURCE_VMS):
            name = f"batch-{index}-{uuid.uuid4().hex[:6]}"
            workdir = tmp_path / "sources" / name
            workdir.mkdir(parents=True)
            sources[name] = random_disk(workdir / "disk.raw")
            prepare_image_vm(sim, workdir, source_vm, name, sources[name], "disk.vmdk")
        config = parse_config({
            "export": {"base_path": str(tmp_path / "exports")},
            "hyper2kvm": {"daemon_enabled": True, "watch_dir": str(watch),
                          "output_dir": str(out), "poll_interval": "100ms",
                          "job_timeout": "5m"},
            "libvirt": {"uri": "test:///default"},
            "providers": {"vsphere": sim.provider_settings()},
        }, "(test)", env={})
        registry = ProviderRegistry(config)
        kind = ExportKind()
        contexts = {name: job_context(kind, {
            "vm_identifier": name, "provider": "vsphere", "export_method": "ova",
            "export_path": str(tmp_path / "exports" / name),
            "options": {"shutdown_vm": False, "remove_cdrom": True, "compress": True},
            "hyper2kvm_integration": {"enabled": True, "auto_convert": False,
                                      "daemon_mode": True, "instance": instance},
        }, config, registry, job_id=f"job-{index}") for index, name in enumerate(sources)}
        try:
            results = await asyncio.gather(*(run_job(kind, ctx) for ctx in contexts.values()))
        finally:
            await registry.close()

    for (name, ctx), result in zip(contexts.items(), results):
        handoff = result["hyper2kvm"]
        assert handoff["mode"] == "daemon", ctx.text()
        [disk] = handoff["disks"]
        image, manifest = Path(disk["path"]), Path(disk["manifest"])
        assert image.name == "disk.qcow2" and image.parent.name == manifest.stem
        assert image.parent.parent.parent == out and manifest.name.startswith(name)
        qemu_img("compare", "-q", str(sources[name]), str(image))
        assert f"Manifest completed: {manifest.stem}" in daemon.text()
        assert ctx.stages[-2:] == ["handoff", "waiting for hyper2kvm"]
        assert ctx.done == ctx.total > 0
    assert not list((watch / instance / "to_be_processed").glob("*.json"))
