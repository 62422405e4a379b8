"""Helpers for the disk-format tests: images made with qemu-img from bytes we write."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path


MiB = 1 << 20
# (offset, length) of the random data written into every test disk; the rest is holes.
DATA_EXTENTS = ((0, 64 * 1024), (3 * MiB + 4096, 200 * 1024), (13 * MiB, 5000))
DISK_SIZE = 16 * MiB
DATA_BYTES = sum(length for _offset, length in DATA_EXTENTS)
SAMPLE_OVF = Path(__file__).with_name("sample.ovf")


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def make_raw(path: Path, size: int = DISK_SIZE, extents=DATA_EXTENTS, seed: int = 1) -> Path:
    """A sparse raw disk with random bytes at `extents` and holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, length in extents:
            fh.seek(offset)
            fh.write(rng.randbytes(length))
    return path


def make_image(tmp: Path, fmt: str, name: str = "disk", subformat: str | None = None,
               size: int = DISK_SIZE, seed: int = 1) -> tuple[Path, Path]:
    """(raw reference, image in `fmt`) made from the same content."""
    raw = make_raw(tmp / f"{name}-ref.raw", size, seed=seed)
    suffix = {"vpc": "vhd"}.get(fmt, fmt)
    image = tmp / f"{name}.{suffix}"
    args = ["convert", "-f", "raw", "-O", fmt]
    if subformat:
        args += ["-o", f"subformat={subformat}"]
    if fmt == "vpc":  # keep the exact size instead of rounding to a CHS geometry
        args += ["-o", "force_size=on"]
    qemu_img(*args, raw, image)
    return raw, image


def images_equal(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)],
                          capture_output=True).returncode == 0


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def grain_ends(vmdk: Path) -> list[int]:
    """File offsets where each grain of a qemu-made streamOptimized VMDK ends."""
    data = vmdk.read_bytes()
    pos = int.from_bytes(data[64:72], "little") * 512
    ends = []
    while pos + 12 <= len(data):
        size = int.from_bytes(data[pos + 8:pos + 12], "little")
        if not size:
            break
        pos += (12 + size + 511) // 512 * 512
        ends.append(pos)
    return ends


def small_ovf_text() -> str:
    """The sample OVF with disks small enough for tests (16 MiB each)."""
    return SAMPLE_OVF.read_text().replace(
        'ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30"',
        'ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20"').replace(
        'ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20"',
        'ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20"')


def manifest(files: dict[str, bytes], alg: str = "SHA256") -> bytes:
    fn = {"SHA256": hashlib.sha256, "SHA1": hashlib.sha1}[alg]
    return "".join(f"{alg}({name})= {fn(data).hexdigest()}\n"
                   for name, data in files.items()).encode()
