"""Benchmark: our streamOptimized VMDK -> qcow2 path against bare `qemu-img convert`.

Builds a raw disk of --size bytes (a mix of incompressible data, text-like data and
holes, like a real guest disk), turns it into a streamOptimized VMDK with qemu-img,
then in the same run times `qemu-img convert -O qcow2` and our `convert_image`
(parallel decoder, in a child process that times itself) in alternating rounds
after a `sync` (best of each), checks both with `qemu-img compare` and prints the
times, the ratio (goal <= 0.75), CPU seconds and each one's own peak RSS. The
same for a VHDX of the same content, where convert_image runs qemu-img itself
(goal: job overhead <= 5 %). qemu-img does not flush its output, convert_image
does (write, fsync, rename), so a "qemu-img + sync" time is shown as well, and
"qemu-img -t none -W": the command line convert_image itself runs for uncompressed
output (`qemu_img_convert_args`, see service/disks/convert.py), so that ratio is
the job's own overhead.

    .venv/bin/python bench/convert.py --size 2G [--dir /var/tmp] [--rounds 2] [--keep]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hypersdk.service.allocator import keep_heap_padding
from hypersdk.service.direct_io import supports_direct_io
from hypersdk.service.disks.convert import convert_image, detect_format, qemu_img_convert_args

MiB = 1 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def make_raw(path: Path, size: int, seed: int = 7) -> None:
    """Per MiB: ~40 % random bytes, ~40 % text-like bytes, ~20 % hole."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4096)]
    text = b" ".join(rng.choice(words) for _ in range(200000))[:MiB]
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, MiB):
            fh.seek(offset)
            chunk = min(MiB, size - offset)
            rand_len = int(chunk * 0.4) // 4096 * 4096
            text_len = int(chunk * 0.4) // 4096 * 4096
            start = rng.randrange(0, len(text) - text_len)
            fh.write(os.urandom(rand_len) + text[start:start + text_len])


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run cmd; (wall seconds, CPU seconds, its own peak RSS in MiB, its stdout).

    The peak is the child's VmHWM, polled: wait4's ru_maxrss would include this
    process's memory, which a child inherits as its high-water mark through fork+exec.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak, exited = [0], threading.Event()

    def watch() -> None:
        while not exited.wait(0.02):
            peak[0] = max(peak[0], _vm_hwm_kib(proc.pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = proc.stdout.read()  # ends when the child exits (it is not reaped yet)
    peak[0] = max(peak[0], _vm_hwm_kib(proc.pid))
    exited.set()
    watcher.join()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - start, cpu, peak[0] / 1024, out


def child_convert(source: str, target: str) -> None:
    """Run in a child process so its time and peak RSS are its own."""
    keep_heap_padding()  # as hypervisord does at start
    start = time.perf_counter()
    asyncio.run(convert_image(Path(source), Path(target), out_format="qcow2"))
    print(f"{time.perf_counter() - start:.6f}")


def _median(results: list[tuple[float, float, float]]) -> float:
    return statistics.median(r[0] for r in results)


def compare(work: Path, raw: Path, source: Path, label: str, rounds: int, goal: str) -> None:
    """Time qemu-img and convert_image on `source` -> qcow2 in alternating rounds."""
    bare_out, ours_out = work / "bare.qcow2", work / "ours.qcow2"
    in_format, direct_io = detect_format(source), supports_direct_io(work)
    bare, direct, ours = [], [], []  # (wall, cpu, rss) per round
    bare_durable = []  # qemu-img's time plus flushing its output, as convert_image does
    for _round in range(rounds):
        for out in (bare_out, ours_out):
            out.unlink(missing_ok=True)
        run(["sync"])
        wall, cpu, rss, _out = measured(["qemu-img", "convert", "-O", "qcow2", str(source),
                                         str(bare_out)])
        flush, _cpu, _rss, _out = measured(["sync", str(bare_out)])
        bare.append((wall, cpu, rss))
        bare_durable.append(wall + flush)
        ours_out.unlink(missing_ok=True)
        run(["sync"])
        direct.append(measured(qemu_img_convert_args(source, in_format, ours_out, "qcow2",
                                                     compress=False, direct=direct_io))[:3])
        ours_out.unlink()
        run(["sync"])
        _wall, cpu, rss, out = measured([sys.executable, __file__, "--child", str(source),
                                         str(ours_out)])
        ours.append((float(out.strip()), cpu, rss))
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(ours_out)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(bare_out), str(ours_out)])
    data_mb = raw.stat().st_size / 1e6
    print(f"== {label} ({source.stat().st_size / MiB:.0f} MiB file) -> qcow2")
    for name, results in (("qemu-img convert", bare), ("qemu-img -t none -W", direct),
                          ("hypersdk convert_image", ours)):
        best = min(r[0] for r in results)
        print(f"  {name:23s} {best:6.2f} s ({data_mb / best:5.0f} MB/s)  rounds: "
              f"{', '.join(f'{r[0]:.2f}' for r in results)}  CPU (best) "
              f"{min(r[1] for r in results):.2f} s  peak RSS {max(r[2] for r in results):.0f} MiB")
    ours_best = min(r[0] for r in ours)
    print(f"  {'qemu-img + sync':23s} {min(bare_durable):6.2f} s  (convert_image fsyncs before "
          f"its rename; qemu-img leaves its output in the page cache)")
    print(f"  ratio hypersdk/qemu-img: {ours_best / min(r[0] for r in bare):.2f}, against "
          f"qemu-img + sync: {ours_best / min(bare_durable):.2f}, against qemu-img -t none -W: "
          f"{ours_best / min(r[0] for r in direct):.2f} (goal {goal}); "
          f"medians against qemu-img: {_median(ours) / _median(bare):.2f} (a noisy machine "
          f"flatters the best of the one that varies more); "
          f"qemu-img compare: identical")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="virtual disk size (default 2G)")
    parser.add_argument("--dir", default="/var/tmp", help="where to put the test images")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating timed rounds; the best of each is reported")
    parser.add_argument("--keep", action="store_true", help="keep the images")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_convert(*args.child)
        return 0
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    try:
        raw, vmdk, vhdx = work / "src.raw", work / "src.vmdk", work / "src.vhdx"
        make_raw(raw, size)
        run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(raw), str(vmdk)])
        run(["qemu-img", "convert", "-O", "vhdx", str(raw), str(vhdx)])
        print(f"disk: {size / MiB:.0f} MiB virtual, ~80 % data, the rest holes")
        compare(work, raw, vmdk, "streamOptimized VMDK", args.rounds, "<= 0.75")
        compare(work, raw, vhdx, "VHDX", args.rounds, "<= 1.05")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              f"(other work on the machine skews wall times; CPU includes Python start-up)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
