"""Fixtures for the disk-format tests."""
from __future__ import annotations

import pytest

from hypersdk.service.config import parse_config
from tests.vsphere.fake_context import FakeSubmitContext


def roots_config(tmp_path):
    """A Config that lets callers name files under tmp_path (paths.sources / outputs)."""
    return parse_config({"paths": {"sources": [str(tmp_path)], "outputs": [str(tmp_path)]}},
                        "test")


@pytest.fixture
def submit_ctx(tmp_path) -> FakeSubmitContext:
    return FakeSubmitContext(roots_config(tmp_path), None)
