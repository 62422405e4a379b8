"""Warm migration: delta round time against the changed bytes, and downtime warm vs cold.

Starts the govmomi simulator with its extension (tests/vcsim/cbt.go), gives a running
VM one dense flat disk of --size, then
1. pre-copies it (round 1: the whole disk), and for each delta of --deltas writes that
   many bytes in 64 KiB blocks at random places of the disk and runs one delta round.
   It prints each round's time split into the copy (ranged reads and in-place writes:
   what scales with the delta) and the source's bookkeeping (snapshot and the
   QueryChangedDiskAreas call: the simulator hashes the whole disk file for them, a cost
   of the simulator — ESXi keeps a change bitmap), and the copy's seconds per MiB;
2. measures downtime: a cold export job (the VM shut down for the whole copy) against a
   warm one cut over after its first round with --cutover-delta changed meanwhile
   (downtime = from the shutdown request to the end of the job).

    .venv/bin/python bench/warm.py --size 1GiB --deltas 1MiB,8MiB,64MiB
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyVmomi import vim  # noqa: E402

from hypersdk.service.config import parse_config  # noqa: E402
from hypersdk.service.config_schema import parse_size  # noqa: E402
from hypersdk.service.jobs.export import ExportKind  # noqa: E402
from hypersdk.service.jobs.warm import WarmCopy  # noqa: E402
from hypersdk.service.model import ExportOptions  # noqa: E402
from hypersdk.service.providers.registry import ProviderRegistry  # noqa: E402
from tests.support.fake_sink import FakeExportSink  # noqa: E402
from tests.vcsim.harness import (Simulator, find_vm, give_disks, local_file,  # noqa: E402
                                 wait_task)
from tests.vsphere.fake_context import job_context, run_job  # noqa: E402

VM = "DC0_H0_VM0"
BLOCK = 64 << 10
MiB = 1 << 20


class TimedSource:
    """A WarmSource that adds up the seconds spent in each of its calls."""

    def __init__(self, source) -> None:
        self.source, self.vm, self.seconds = source, source.vm, {}

    def __getattr__(self, name):
        call = getattr(self.source, name)

        async def timed(*args):
            start = time.perf_counter()
            try:
                return await call(*args)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


def scatter(path: Path, nbytes: int, rng: random.Random) -> None:
    """Change `nbytes` of the disk in 64 KiB blocks at distinct random places."""
    blocks = rng.sample(range(path.stat().st_size // BLOCK), nbytes // BLOCK)
    with open(path, "r+b") as handle:
        for block in blocks:
            handle.seek(block * BLOCK)
            handle.write(rng.randbytes(BLOCK))


async def delta_rounds(registry, flat: Path, work: Path, deltas: list[int]) -> None:
    provider = await registry.get("vsphere")
    sink = FakeExportSink()
    timed = TimedSource(await provider.warm_source(VM, ExportOptions(), sink))
    copy = WarmCopy(timed, work, None, sink, "bench")
    rng = random.Random(7)
    copy.open(["bench.raw"])
    try:
        print(f"{'changed':>10} {'copied':>10} {'round s':>8} {'copy s':>8} {'bookkeeping s':>13}"
              f" {'copy s/MiB':>10}")
        for delta in [None, *deltas]:
            if delta is not None:
                scatter(flat, delta, rng)
            timed.seconds.clear()
            entry = await copy.copy_round(False)
            bookkeeping = sum(timed.seconds.get(name, 0.0) for name in
                              ("create_snapshot", "changed_extents", "remove_snapshots"))
            copying = entry["seconds"] - bookkeeping
            label = "(all)" if delta is None else f"{delta // MiB} MiB"
            print(f"{label:>10} {entry['bytes'] // MiB:>7} MiB {entry['seconds']:8.2f} "
                  f"{copying:8.2f} {bookkeeping:13.2f} {copying / (entry['bytes'] / MiB):10.4f}")
    finally:
        copy.close()
        await timed.source.close()


async def export_job(config, registry, body: dict, run: str,
                     during=None) -> tuple[dict, float]:
    kind = ExportKind()
    ctx = job_context(kind, {"vm_identifier": VM, "provider": "vsphere",
                             "export_method": "disk", "export_path": run, **body},
                      config, registry, job_id=f"bench-{run}")
    start = time.perf_counter()
    job = asyncio.ensure_future(run_job(kind, ctx))
    if during is not None:
        await during(ctx)
    result = await job
    elapsed = time.perf_counter() - start
    shutil.rmtree(result["export_dir"])
    return result, elapsed


async def downtimes(sim, si, config, registry, flat: Path, delta: int) -> None:
    _, cold = await export_job(config, registry, {"options": {"shutdown_vm": True}}, "cold")
    wait_task(find_vm(si, VM).PowerOnVM_Task())

    async def cut_over_after_round_one(ctx) -> None:
        while not any("pre-copy round 1" in message for message in ctx.messages):
            await asyncio.sleep(0.05)
        scatter(flat, delta, random.Random(11))
        ctx.cutover.set()

    result, total = await export_job(config, registry, {"warm": True}, "warm",
                                     cut_over_after_round_one)
    warm = result["downtime_seconds"]
    print(f"cold export: downtime {cold:.2f}s (the VM is off for the whole job)")
    print(f"warm export: downtime {warm:.2f}s ({delta // MiB} MiB changed before the cutover; "
          f"the whole job took {total:.2f}s, rounds "
          + ", ".join(f"{r['bytes'] // MiB} MiB in {r['seconds']:.2f}s" for r in result["rounds"])
          + f"); ratio warm/cold {warm / cold:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="disk size")
    parser.add_argument("--deltas", default="1MiB,8MiB,64MiB", help="changed bytes per round")
    parser.add_argument("--cutover-delta", default="8MiB", help="changed before the cutover")
    args = parser.parse_args()
    size = parse_size(args.size)
    deltas = [parse_size(d) for d in args.deltas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hypersdk-bench-warm-", dir="/var/tmp"))
    try:
        with Simulator() as sim:
            si = sim.connect()
            print(f"preparing a dense {args.size} flat disk ...", flush=True)
            [disk] = give_disks(sim, si, VM, [size], work, dense=True, flat=True)
            shutil.rmtree(disk.local_vmdk.parent)
            wait_task(find_vm(si, VM).PowerOnVM_Task())
            flat = local_file(si, disk.datastore_path.replace(".vmdk", "-flat.vmdk"))
            base = work / "exports"
            base.mkdir()
            config = parse_config({"export": {"base_path": str(base)},
                                   "providers": {"vsphere": sim.provider_settings()}},
                                  "(bench)", env={})
            registry = ProviderRegistry(config)
            await delta_rounds(registry, flat, work, deltas)
            await downtimes(sim, si, config, registry, flat, parse_size(args.cutover_delta))
            await registry.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
