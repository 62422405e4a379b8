"""Benchmark: export + convert end to end, overlapped, against curl then qemu-img.

Starts the govmomi simulator and gives a VM one disk of --size whose datastore file
is a streamOptimized VMDK of a realistic content mix (bench/convert.py's: random
data, text-like data and holes). Then, each in a child process that is timed and
whose own peak RSS (VmHWM) is read:
- `curl` of the disk's datastore URL, then `qemu-img convert -O qcow2` of the file
  (the sequential baseline; both stages also stand alone);
- our export job alone (`export_method: disk`, no conversion);
- our converter alone (`convert_image` of the curl'ed file to qcow2);
- our export job with the Direct Pipeline (`hyper2kvm_integration` {auto_convert,
  qcow2}), where the disk is converted while it downloads.
Our times are the work's own, without the child's Python start-up (about 0.3 s).
Prints the times, the pipeline's ratio to the sequential baseline and to the slower
of our two stages alone (goal <= 1.15: the stages overlap), and each one's peak RSS
(goal: flat as the disk grows; compare two sizes). The result is checked with
`qemu-img compare` against the raw content.

    .venv/bin/python bench/pipeline.py --size 2G [--rounds 1] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.convert import MiB, make_raw, measured, parse_size, run  # noqa: E402
from hypersdk.service.allocator import keep_heap_padding  # noqa: E402
from hypersdk.service.config import parse_config  # noqa: E402
from hypersdk.service.jobs.export import ExportKind  # noqa: E402
from hypersdk.service.providers.registry import ProviderRegistry  # noqa: E402
from tests.vcsim.harness import Simulator, give_disks  # noqa: E402
from tests.vsphere.fake_context import job_context, run_job  # noqa: E402

VM = "DC0_H0_VM0"
CONVERT_CHILD = str(Path(__file__).with_name("convert.py"))


async def child_job(spec_path: str) -> None:
    """Run one export job as the engine would; print its wall time and result."""
    keep_heap_padding()  # as hypervisord does at start
    spec = json.loads(Path(spec_path).read_text())
    config = parse_config(spec["config"], "(bench)", env={})
    registry = ProviderRegistry(config)
    kind = ExportKind()
    try:
        ctx = job_context(kind, spec["definition"], config, registry, job_id="job-bench")
        start = time.perf_counter()
        result = await run_job(kind, ctx)
        elapsed = time.perf_counter() - start
    finally:
        await registry.close()
    print(json.dumps({"seconds": elapsed, "result": result}))


def job_spec(work: Path, sim: Simulator, name: str, convert: bool, chunk_size: str) -> Path:
    base, images = work / f"{name}-exports", work / f"{name}-images"
    base.mkdir()
    definition = {"vm_identifier": VM, "provider": "vsphere", "export_method": "disk",
                  "export_path": "vm"}
    if convert:
        definition["hyper2kvm_integration"] = {"enabled": True, "auto_convert": True,
                                               "format": "qcow2"}
    spec = {"config": {"export": {"base_path": str(base), "chunk_size": chunk_size},
                       "hyper2kvm": {"output_dir": str(images)},
                       "providers": {"vsphere": sim.provider_settings()}},
            "definition": definition}
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


Measurement = tuple[float, float, float]  # wall seconds, CPU seconds, peak RSS MiB


def timed_job(spec: Path) -> tuple[Measurement, dict]:
    """The export job in a child process: its own time (without Python's start-up)."""
    run(["sync"])
    _wall, cpu, rss, out = measured([sys.executable, __file__, "--child-job", str(spec)])
    data = json.loads(out)
    return (data["seconds"], cpu, rss), data["result"]


def timed(cmd: list[str]) -> Measurement:
    run(["sync"])
    wall, cpu, rss, _out = measured(cmd)
    return wall, cpu, rss


def timed_convert(source: Path, target: Path) -> Measurement:
    """convert_image in a child process: its own time (without Python's start-up),
    like the jobs' (bench/convert.py's child prints it)."""
    run(["sync"])
    _wall, cpu, rss, out = measured([sys.executable, CONVERT_CHILD, "--child", str(source),
                                     str(target)])
    return float(out.strip()), cpu, rss


def one_round(work: Path, sim: Simulator, url: str, raw: Path, chunk_size: str,
              index: int) -> dict[str, Measurement]:
    """Every measurement once; outputs removed as soon as they are checked."""
    times = {}
    fetched, bare, ours = work / "curl.vmdk", work / "bare.qcow2", work / "ours.qcow2"
    times["curl"] = timed(["curl", "-sSf", "-o", str(fetched), url])
    times["qemu-img convert"] = timed(["qemu-img", "convert", "-O", "qcow2", str(fetched),
                                       str(bare)])
    bare.unlink()
    times["convert_image"] = timed_convert(fetched, ours)
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(ours)])
    for path in (fetched, ours):
        path.unlink()
    times["export job"], _result = timed_job(job_spec(work, sim, f"export{index}", False,
                                                      chunk_size))
    shutil.rmtree(work / f"export{index}-exports")
    times["export+convert job"], result = timed_job(job_spec(work, sim, f"pipeline{index}", True,
                                                             chunk_size))
    converted = result["hyper2kvm"]["disks"][0]["path"]
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), converted])
    for name in ("exports", "images"):
        shutil.rmtree(work / f"pipeline{index}-{name}")
    return times


def report(rounds: list[dict[str, Measurement]], size: int, file_bytes: int) -> None:
    best = {name: min(r[name][0] for r in rounds) for name in rounds[0]}
    cpu = {name: min(r[name][1] for r in rounds) for name in rounds[0]}
    rss = {name: max(r[name][2] for r in rounds) for name in rounds[0]}
    print(f"disk: {size / MiB:.0f} MiB virtual, streamOptimized file {file_bytes / MiB:.0f} MiB; "
          f"best of {len(rounds)} round(s)")
    for name in best:
        runs = ", ".join(f"{r[name][0]:.2f}" for r in rounds)
        print(f"  {name:20s} {best[name]:7.2f} s  (runs: {runs})  CPU {cpu[name]:6.2f} s  "
              f"peak RSS {rss[name]:5.0f} MiB")
    baseline = best["curl"] + best["qemu-img convert"]
    slower = max(best["export job"], best["convert_image"])
    pipeline = best["export+convert job"]
    print(f"  sequential baseline (curl, then qemu-img convert): {baseline:.2f} s")
    print(f"  ratio pipeline/baseline: {pipeline / baseline:.2f}")
    print(f"  ratio pipeline/slower stage alone ({slower:.2f} s): {pipeline / slower:.2f} "
          f"(goal <= 1.15)")
    print(f"  qemu-img compare against the raw content: identical; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (CPU of the Python jobs "
          f"includes start-up; stages that together need more CPU than there are cores "
          f"cannot fully overlap)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="virtual disk size (default 2G)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the best is reported")
    parser.add_argument("--dir", default="/var/tmp", help="where to put the images")
    parser.add_argument("--chunk-size", default="10MiB", help="export.chunk_size")
    parser.add_argument("--child-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_job:
        asyncio.run(child_job(args.child_job))
        return 0
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.dir))
    try:
        raw, vmdk = work / "src.raw", work / "src.vmdk"
        print(f"preparing a {size / MiB:.0f} MiB disk ...", flush=True)
        make_raw(raw, size)
        run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(raw), str(vmdk)])
        with Simulator() as sim:
            si = sim.connect()
            [disk] = give_disks(sim, si, VM, [size], work)
            disk.local_vmdk.unlink()
            sim.put_file(vmdk, disk.datastore_path, "DC0")
            url = f"http://{sim.host}:{sim.port}" + sim.datastore_url_path(disk.datastore_path,
                                                                            "DC0")
            rounds = [one_round(work, sim, url, raw, args.chunk_size, i)
                      for i in range(args.rounds)]
        report(rounds, size, vmdk.stat().st_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
