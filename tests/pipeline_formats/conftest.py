"""Fixtures for the disk-format tests."""
from __future__ import annotations

import pytest

from hypersdk.service.config import parse_config
from tests.vsphere.fake_context import FakeSubmitContext


@pytest.fixture
def submit_ctx() -> FakeSubmitContext:
    return FakeSubmitContext(parse_config({}, "test"), None)
