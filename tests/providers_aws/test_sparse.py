"""SparseImage and copy_sparse on real files: data at offsets, holes kept, nothing left on failure."""
from __future__ import annotations

import hashlib
import os

import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.providers.sparse import SparseImage

MIB = 1024 * 1024


def _allocated(path) -> int:
    return path.stat().st_blocks * 512


def test_blocks_land_at_offsets_and_the_rest_stays_holes(tmp_path):
    target = tmp_path / "disk.raw"
    image = SparseImage(target, 64 * MIB)
    image.write(0, b"A" * 4096)
    image.write(40 * MIB, b"B" * 4096)
    digest = image.commit()

    data = target.read_bytes()
    assert len(data) == 64 * MIB and digest == hashlib.sha256(data).hexdigest()
    assert data[:4096] == b"A" * 4096 and data[40 * MIB:40 * MIB + 4096] == b"B" * 4096
    assert data.count(0) == 64 * MIB - 8192
    assert _allocated(target) < MIB
    assert os.listdir(tmp_path) == ["disk.raw"]


def test_a_copy_of_a_base_keeps_its_holes_and_grows(tmp_path):
    base = tmp_path / "base.raw"
    first = SparseImage(base, 16 * MIB)
    first.write(8 * MIB, b"C" * 8192)
    first.commit()

    grown = SparseImage(tmp_path / "next.raw", 32 * MIB, base=base)
    grown.write(0, b"D" * 512)
    grown.commit()
    data = (tmp_path / "next.raw").read_bytes()
    assert len(data) == 32 * MIB
    assert data[:512] == b"D" * 512 and data[8 * MIB:8 * MIB + 8192] == b"C" * 8192
    assert data.count(0) == 32 * MIB - 512 - 8192
    assert _allocated(tmp_path / "next.raw") < MIB


def test_outside_write_fails_and_discard_leaves_nothing(tmp_path):
    image = SparseImage(tmp_path / "disk.raw", MIB)
    with pytest.raises(Failed, match="outside the image"):
        image.write(MIB - 100, b"x" * 512)
    image.discard()
    image.discard()  # idempotent
    assert os.listdir(tmp_path) == []
