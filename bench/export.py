"""Export throughput and memory: our export job vs curl on the same datastore file.

Starts the govmomi simulator, gives a VM one dense disk of --size (every MiB holds
data, so the VMDK on the datastore is as large as the disk), then, alternating,
downloads that file with `curl` and runs the export job (`export_method: disk`:
discovery, free-space check, streamed hashed download, manifest). Prints both
rates, their ratio (goal >= 0.9) and this process's peak RSS (goal < 150 MiB;
the setup runs qemu-img and curl as child processes, so the figure is the
export's). It also prints the CPU seconds each side used and the load average:
the export hashes every byte (SHA-256, ~0.7 CPU-s per GiB) on top of receiving it,
so on a 2-core machine other load shows in the ratio. Our export fsyncs what it
wrote (O_DIRECT, so that is quick); curl does not, hence the "curl+fsync" line.
Each run also exports once more recording resume checkpoints in a real store every
--checkpoint-interval (fdatasync plus a row each; 0 skips it), and prints that rate
against the export's without them (goal >= 0.95).

    .venv/bin/python bench/export.py --size 2GiB --repeat 2
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypersdk.service.allocator import keep_heap_padding  # noqa: E402
from hypersdk.service.config import parse_config  # noqa: E402
from hypersdk.service.config_schema import parse_size  # noqa: E402
from hypersdk.service.job_output import StoreCheckpoints  # noqa: E402
from hypersdk.service.jobs.export import ExportKind  # noqa: E402
from hypersdk.service.providers.registry import ProviderRegistry  # noqa: E402
from hypersdk.service.store import JobRecord, Store  # noqa: E402
from tests.vcsim.harness import Simulator, give_disks  # noqa: E402
from tests.vsphere.fake_context import job_context, run_job  # noqa: E402

VM = "DC0_H0_VM0"


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds so far of this process or its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def curl_download(sim: Simulator, datastore_path: str, target: Path) -> tuple[float, float]:
    """Seconds for curl alone, and for curl plus an fsync of its file (our export fsyncs)."""
    url = f"http://{sim.host}:{sim.port}" + sim.datastore_url_path(datastore_path, "DC0")
    start = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(target), url], check=True)
    curl_only = time.perf_counter() - start
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return curl_only, time.perf_counter() - start


async def our_export(config, registry, run: int | str,
                     checkpoints: StoreCheckpoints | None = None) -> tuple[float, int]:
    kind = ExportKind()
    ctx = job_context(kind, {"vm_identifier": VM, "provider": "vsphere",
                             "export_method": "disk", "export_path": f"run{run}"},
                      config, registry, job_id=f"bench-{run}")
    ctx.checkpoints = checkpoints
    start = time.perf_counter()
    result = await run_job(kind, ctx)
    elapsed = time.perf_counter() - start
    shutil.rmtree(result["export_dir"])
    return elapsed, result["disks"][0]["bytes"]


async def _checkpointed_export(config, registry, store: Store, run: int, interval: int) -> float:
    """Seconds for the export recording checkpoints in `store`, as a job's do."""
    job_id = f"bench-{run}-checkpointed"
    await store.insert_job(JobRecord(id=job_id, kind="export", status="running", definition={}))
    elapsed, _ = await our_export(config, registry, f"{run}-checkpointed",
                                  StoreCheckpoints(store, job_id, interval, store.soon))
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2GiB", help="disk size, e.g. 512MiB or 2GiB")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--chunk-size", default="10MiB", help="export.chunk_size")
    parser.add_argument("--checkpoint-interval", default="64MiB",
                        help="export.checkpoint_interval of the runs with checkpoints (0: none)")
    args = parser.parse_args()
    interval = parse_size(args.checkpoint_interval)
    keep_heap_padding()  # as hypervisord does at start
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="hypersdk-bench-export-", dir="/var/tmp"))
    try:
        with Simulator() as sim:
            si = sim.connect()
            print(f"preparing a dense {args.size} disk ...", flush=True)
            [disk] = give_disks(sim, si, VM, [size], work, dense=True)
            file_bytes = disk.local_vmdk.stat().st_size
            disk.local_vmdk.unlink()
            base = work / "exports"
            base.mkdir()
            config = parse_config({"export": {"base_path": str(base),
                                              "chunk_size": args.chunk_size},
                                   "providers": {"vsphere": sim.provider_settings()}},
                                  "(bench)", env={})
            registry = ProviderRegistry(config)
            store = Store(work / "state" / "hypersdk.db")
            curl_times, synced_times, our_times, checkpointed_times = [], [], [], []
            curl_cpu, our_cpu = [], []
            for run in range(args.repeat):
                before = cpu_seconds(resource.RUSAGE_CHILDREN)
                curl_only, synced = curl_download(sim, disk.datastore_path, work / "curl.vmdk")
                curl_cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - before)
                curl_times.append(curl_only)
                synced_times.append(synced)
                (work / "curl.vmdk").unlink()
                before = cpu_seconds(resource.RUSAGE_SELF)
                elapsed, nbytes = await our_export(config, registry, run)
                our_cpu.append(cpu_seconds(resource.RUSAGE_SELF) - before)
                assert nbytes == file_bytes, (nbytes, file_bytes)
                our_times.append(elapsed)
                if interval:
                    checkpointed_times.append(
                        await _checkpointed_export(config, registry, store, run, interval))
            await registry.close()
            recorded = (await store.execute(
                "SELECT COUNT(*) FROM download_checkpoints")).fetchone()[0]
            await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = file_bytes / 1e6
    curl_rate, our_rate = mb / min(curl_times), mb / min(our_times)
    synced_rate = mb / min(synced_times)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"file: {file_bytes} bytes ({args.size} disk), best of {args.repeat}")
    runs = ", ".join(f"{t:.2f}s" for t in curl_times)
    print(f"curl:       {curl_rate:8.1f} MB/s  (runs: {runs})")
    print(f"curl+fsync: {synced_rate:8.1f} MB/s  "
          f"(runs: {', '.join(f'{t:.2f}s' for t in synced_times)})")
    print(f"export:     {our_rate:8.1f} MB/s  (runs: {', '.join(f'{t:.2f}s' for t in our_times)}; "
          f"includes discovery, hashing, fsync, manifest)")
    print(f"ratio export/curl: {our_rate / curl_rate:.2f} (goal >= 0.9); "
          f"export/(curl+fsync): {our_rate / synced_rate:.2f}")
    if checkpointed_times:
        rate = mb / min(checkpointed_times)
        print(f"export with checkpoints every {args.checkpoint_interval}: {rate:8.1f} MB/s "
              f"(runs: {', '.join(f'{t:.2f}s' for t in checkpointed_times)}; {recorded} "
              f"checkpoints recorded); ratio to the export without: {rate / our_rate:.2f} "
              "(goal >= 0.95)")
    print(f"peak RSS of this process: {rss_mib:.0f} MiB (goal < 150 MiB)")
    print(f"CPU seconds per run: curl {', '.join(f'{t:.2f}' for t in curl_cpu)}; "
          f"export {', '.join(f'{t:.2f}' for t in our_cpu)}")
    print(f"load average (1, 5, 15 min) at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    asyncio.run(main())
