"""Warm migration from vSphere against the simulator extension (tests/vcsim/cbt.go):
changed block tracking backed by the disk files the simulator serves."""
from __future__ import annotations

import asyncio
import os
import subprocess

from hypersdk.service.jobs.warm import WarmSettings, run_warm
from hypersdk.service.model import ExportOptions
from hypersdk.service.providers.vsphere_warm import _snapshot_tree
from tests.support.fake_sink import FakeExportSink
from tests.vcsim.harness import find_vm, folder_bytes

from .conftest import WARM_VM

BLOCK = 64 << 10  # the extension's change tracking granularity


def _write(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


async def test_simulator_extension_rounds_copy_only_changed_extents(sim, si, running_vm,
                                                                    provider, tmp_path):
    sink = FakeExportSink()
    source = await provider.warm_source(WARM_VM, ExportOptions(), sink)
    cutover = asyncio.Event()
    served = []  # the simulator's count after each round

    def on_round(entry: dict) -> None:
        served.append(folder_bytes(sim))
        if entry["round"] == 1:  # two blocks in a hole, one block over data
            _write(running_vm, 3 * BLOCK + 100, b"x" * (BLOCK + 10))
            _write(running_vm, 5 << 20, b"y" * 7)
        elif entry["round"] == 2:
            _write(running_vm, (8 << 20) - BLOCK, b"z" * BLOCK)
            cutover.set()

    before = folder_bytes(sim)
    target = tmp_path / "images"
    target.mkdir()
    try:
        result = await run_warm(source, target, ["disk1.raw"], None,
                                WarmSettings(precopy_interval=1), cutover, sink, "t",
                                on_round=on_round)
    finally:
        await source.close()

    rounds = [(r["round"], r["bytes"], r["final"]) for r in result.rounds]
    # round 1: the data the disk holds (1 MiB at each quarter); then only the changes
    assert rounds == [(1, 4 << 20, False), (2, 3 * BLOCK, False), (3, BLOCK, True)]
    assert served[1] - served[0] == 3 * BLOCK
    assert served[2] - served[1] == BLOCK
    assert served[0] - before < (4 << 20) + 4096  # the data and the descriptor
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                              str(result.disks[0].path), str(running_vm)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert os.stat(result.disks[0].path).st_blocks * 512 < 8 << 20  # sparse
    assert str(find_vm(si, WARM_VM).runtime.powerState) == "poweredOff"
    assert _snapshot_tree(si, find_vm(si, WARM_VM)._moId) == []
    assert any("removed snapshot hypersdk-warm-t-3" in line for line in sink.lines)
