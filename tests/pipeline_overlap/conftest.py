"""Fixtures: a held-back download and real disks (the simulator: tests/support/simulator.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from bench.convert import make_raw
from hypersdk.service.config import parse_config
from tests.vcsim.harness import Simulator


def make_config(tmp_path: Path, sim: Simulator, port: int):
    base = tmp_path / "exports"
    base.mkdir(exist_ok=True)
    return parse_config({
        "export": {"base_path": str(base), "chunk_size": "256KiB", "max_retries": 2},
        "hyper2kvm": {"output_dir": str(tmp_path / "images")},
        "providers": {"vsphere": sim.provider_settings(port=port)},
    }, "(test)", env={})


def stream_optimized_vmdk(directory: Path, name: str, capacity: int) -> tuple[Path, Path]:
    """A streamOptimized VMDK of a disk with a real content mix; (vmdk, its raw source)."""
    raw, vmdk = directory / f"{name}.raw", directory / f"{name}.vmdk"
    make_raw(raw, capacity)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(raw), str(vmdk)],
                   check=True, capture_output=True)
    return vmdk, raw
