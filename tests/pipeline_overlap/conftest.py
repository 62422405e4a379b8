"""Fixtures: a held-back download and real disks (the simulator: tests/support/simulator.py)."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from bench.convert import make_raw
from hypersdk.service.config import parse_config
from tests.vcsim.harness import Simulator
from tests.vsphere.fault_proxy import FaultInjectingProxy


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


class GatedProxy(FaultInjectingProxy):
    """A loopback proxy that holds every response back after `hold_at` bytes until
    `release` is set (`holding` is set once one is held). Small SOAP replies pass."""

    def __init__(self, upstream_host: str, upstream_port: int, hold_at: int) -> None:
        super().__init__(upstream_host, upstream_port, cut_after=hold_at, cuts=0)
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None) -> None:
        sent = 0
        while data := await reader.read(65536):
            if limit is not None and sent < limit <= sent + len(data):
                writer.write(data[:limit - sent])
                await writer.drain()
                self.holding.set()
                await self.release.wait()
                data, sent = data[limit - sent:], limit
            writer.write(data)
            await writer.drain()
            sent += len(data)
