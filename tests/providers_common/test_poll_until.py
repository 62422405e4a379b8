"""The providers' one polling loop for cloud operations."""
from __future__ import annotations

import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.providers.common import poll_until


async def test_returns_what_the_check_found_once_it_finds_it():
    answers = iter([None, None, "ready"])

    async def check():
        return next(answers)

    assert await poll_until(check, interval=0, timeout=5, what="the image") == "ready"


async def test_a_check_that_never_succeeds_fails_naming_what_and_how_long():
    async def check():
        return None

    with pytest.raises(Failed, match=r"^instance i-1 reaching 'running' did not happen within "
                                     r"0.05 s$"):
        await poll_until(check, interval=0.01, timeout=0.05, what="instance i-1 reaching 'running'")


async def test_a_check_that_raises_ends_the_wait_with_its_error():
    calls = []

    async def check():
        calls.append(1)
        raise Failed("snapshot snap-1 failed: no space")

    with pytest.raises(Failed, match="snapshot snap-1 failed"):
        await poll_until(check, interval=0, timeout=5, what="snapshots")
    assert len(calls) == 1
