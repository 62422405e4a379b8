"""Qcow2Writer output checked by qemu-img itself: `qemu-img check` and `compare`."""
from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from hypersdk.service.direct_io import DirectFile
from hypersdk.service.disks.qcow2write import RESERVE_STEP, Qcow2Writer

from .helpers import images_equal, qemu_img


def write_both(tmp_path, size: int, cluster: int, clusters: list[int], seed: int = 3,
               per_write: int = 1):
    """Write the same clusters into a raw reference and, in the given order and
    `per_write` clusters per write_clusters call, a qcow2."""
    rng = random.Random(seed)
    raw, image = tmp_path / "ref.raw", tmp_path / "out.qcow2"
    with open(raw, "wb") as ref:
        ref.truncate(size)
    out = DirectFile(image, os.O_RDWR | os.O_CREAT)
    try:
        writer = Qcow2Writer(out, size, cluster)
        for start in range(0, len(clusters), per_write):
            batch = [(index * cluster, rng.randbytes(min(cluster, size - index * cluster)))
                     for index in clusters[start:start + per_write]]
            with open(raw, "r+b") as ref:
                for offset, data in batch:
                    ref.seek(offset)
                    ref.write(data)
            writer.write_clusters(batch)
        writer.close()
    finally:
        out.close()
    return raw, image


def check(image) -> dict:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_in_order_clusters_across_many_l2_tables(tmp_path):
    # 4 KiB clusters: one L2 table covers 2 MiB, so 24 MiB spans 12 tables.
    size, cluster = 24 << 20, 4096
    chosen = sorted(random.Random(1).sample(range(size // cluster), 700))
    raw, image = write_both(tmp_path, size, cluster, chosen)
    result = check(image)
    assert result["check-errors"] == 0 and result.get("leaks", 0) == 0
    assert result["allocated-clusters"] == len(chosen)
    assert images_equal(raw, image)
    info = json.loads(qemu_img("info", "--output=json", image))
    assert info["virtual-size"] == size and info["cluster-size"] == cluster


def test_out_of_order_clusters_patch_written_tables(tmp_path):
    size, cluster = 24 << 20, 4096
    chosen = random.Random(2).sample(range(size // cluster), 500)  # shuffled
    raw, image = write_both(tmp_path, size, cluster, chosen)
    assert check(image)["check-errors"] == 0
    assert images_equal(raw, image)


def test_batches_of_clusters(tmp_path):
    size, cluster = 8 << 20, 65536
    chosen = [first + n for first in (0, 40, 100) for n in range(0, 12, 2)]
    raw, image = write_both(tmp_path, size, cluster, chosen, seed=4, per_write=6)
    assert check(image)["allocated-clusters"] == 18
    assert images_equal(raw, image)


def test_partial_last_cluster_and_empty_image(tmp_path):
    size, cluster = 10 * 65536 + 4096, 65536
    raw, image = write_both(tmp_path, size, cluster, [0, 10])
    assert check(image)["check-errors"] == 0
    assert images_equal(raw, image)
    (tmp_path / "empty").mkdir()
    empty_raw, empty = write_both(tmp_path / "empty", size, cluster, [])
    assert check(empty).get("allocated-clusters", 0) == 0
    assert images_equal(empty_raw, empty)


def test_refuses_impossible_cluster_sizes(tmp_path):
    out = DirectFile(tmp_path / "x.qcow2", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="power of two"):
            Qcow2Writer(out, 1 << 20, 3000)
    finally:
        out.close()


def _one_cluster_image(tmp_path):
    """A 1 GiB qcow2 with one data cluster written: (path, file stat before close, after)."""
    image = tmp_path / "out.qcow2"
    out = DirectFile(image, os.O_RDWR | os.O_CREAT)
    try:
        assert out.direct  # tmp_path's filesystem takes O_DIRECT, as the pipeline's does
        writer = Qcow2Writer(out, 1 << 30, 65536)
        writer.write_clusters([(0, bytes(range(256)) * 256)])
        before_close = os.fstat(out.fd)
        writer.close()
        after_close = os.fstat(out.fd)
    finally:
        out.close()
    assert check(image)["check-errors"] == 0
    return image, before_close, after_close


def test_space_is_reserved_ahead_and_cut_off_at_close(tmp_path):
    """Data clusters land in blocks allocated RESERVE_STEP ahead, not at the end of
    the file; close() gives back what was not used."""
    _image, writing, closed = _one_cluster_image(tmp_path)
    assert writing.st_size >= RESERVE_STEP and writing.st_blocks * 512 >= RESERVE_STEP
    assert closed.st_size < 1 << 20 and closed.st_blocks * 512 <= closed.st_size


def test_no_reservation_where_it_does_not_fit(small_disk):
    """On a real 4 MiB tmpfs the reservation finds no room (reserve_space says False, as
    where fallocate is missing): the writer appends, and an image that fits is still
    written."""
    _image, writing, closed = _one_cluster_image(small_disk)
    assert writing.st_size < 1 << 20
    assert closed.st_size < 1 << 20
