"""Fixtures for the disk-format tests."""
from __future__ import annotations

import pytest

from .helpers import FakeSubmitContext


@pytest.fixture
def submit_ctx() -> FakeSubmitContext:
    return FakeSubmitContext()
