"""Several hypervisords sharing one PostgreSQL database (tests/support/fleet.py)."""
from __future__ import annotations

import pytest

from tests.support.fleet import Fleet


@pytest.fixture
def fleet(postgres, tmp_path) -> Fleet:
    """No instance yet (`fleet.start(name)`); every one started is stopped at the end."""
    started = Fleet(postgres.new_database(), tmp_path)
    yield started
    started.stop()
