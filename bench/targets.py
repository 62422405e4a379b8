"""Benchmark: uploading a disk into a target's storage pool (service/kvm/targets.py).

Builds a raw disk of --size bytes, half incompressible data and half holes (1 MiB
each, alternating), then uploads it into a raw dir pool of the real libvirtd through
qemu+ssh:// (the real sshd on a loopback port, tests/support/sshd.py), in the same
run, best of --rounds each:
- ours: the job's upload (sparse stream: the holes are not sent);
- `virsh vol-upload --sparse` over the same URI: libvirt's own client, the baseline;
- `virsh vol-upload` without --sparse: every byte sent, what the sparse stream saves.
Each copy is checked with `cmp`; the ratio ours / virsh (goal <= 1.1), the rates, and
this process's peak RSS (memory must stay flat whatever the size) are printed.

    .venv/bin/python bench/targets.py --size 1GiB [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libvirt  # noqa: E402

from hypersdk.service.config_schema import parse_size  # noqa: E402
from hypersdk.service.kvm.targets import Target, _upload, _with_pool  # noqa: E402
from tests.support.libvirtd import ensure_system_libvirt  # noqa: E402
from tests.support.sshd import LoopbackSshd  # noqa: E402
from tests.support.targets import dir_pool  # noqa: E402

CHUNK = 1 << 20


def make_disk(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for offset in range(0, size, 2 * CHUNK):
            fh.seek(offset)
            fh.write(os.urandom(min(CHUNK, size - offset)))
        fh.truncate(size)


def ours(target: Target, disk: Path, name: str) -> str:
    stop = threading.Event()
    return _with_pool(target, lambda pool: _upload(target, pool, disk, name, disk.stat().st_size,
                                                   lambda _n: None, stop))


def virsh(uri: str, pool: str, disk: Path, name: str, sparse: bool) -> str:
    def run(*args: str) -> str:
        return subprocess.run(["virsh", "-q", "-c", uri, *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    run("vol-create-as", pool, name, str(disk.stat().st_size), "--allocation", "0",
        "--format", "raw")
    run("vol-upload", *(["--sparse"] if sparse else []), "--pool", pool, name, str(disk))
    return run("vol-path", "--pool", pool, name)


def best_of(rounds: int, upload, pool) -> float:
    times = []
    for index in range(rounds):
        name = f"bench-{index}.raw"
        started = time.monotonic()
        path = upload(name)
        times.append(time.monotonic() - started)
        subprocess.run(["cmp", str(DISK), path], check=True)
        pool.storageVolLookupByName(name).delete(0)
    return min(times)


def main() -> None:
    global DISK
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="hypersdk-bench-", dir="/var/tmp"))
    keys = Path(tempfile.mkdtemp(prefix="hypersdk-sshd-", dir="/run"))
    sshd = LoopbackSshd(keys)
    conn = libvirt.open(ensure_system_libvirt())
    try:
        DISK = work / "disk.raw"
        make_disk(DISK, size)
        uri = sshd.uri()
        with dir_pool(conn) as pool:
            target = Target("bench", uri, pool.name(), "raw")
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            mine = best_of(args.rounds, lambda name: ours(target, DISK, name), pool)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            base = best_of(args.rounds, lambda name: virsh(uri, pool.name(), DISK, name, True),
                           pool)
            full = best_of(args.rounds, lambda name: virsh(uri, pool.name(), DISK, name, False),
                           pool)
    finally:
        conn.close()
        sshd.stop()
        shutil.rmtree(keys, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    mib = size / (1 << 20)
    print(f"disk {mib:.0f} MiB (half data, half holes) over qemu+ssh://, best of {args.rounds}")
    print(f"ours (sparse stream)     {mine:6.2f} s  {mib / mine:7.0f} MiB/s")
    print(f"virsh vol-upload --sparse {base:6.2f} s  {mib / base:7.0f} MiB/s")
    print(f"virsh vol-upload (full)  {full:6.2f} s  {mib / full:7.0f} MiB/s")
    print(f"ratio ours / virsh --sparse: {mine / base:.2f} (goal <= 1.1); "
          f"sparse / full: {base / full:.2f}")
    print(f"peak RSS of this process: {rss / 1024:.0f} MiB "
          f"(before the upload: {rss_before / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
