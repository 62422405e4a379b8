"""`make demo` is the spec's Pattern 1 through the real service and CLI: keep it working."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~5 min; a first run also builds the guest image (~5 min)
def test_the_demo_migrates_a_guest_that_boots_to_its_login_prompt():
    """Under a name of its own: a user's `make demo` domain on this machine is left alone."""
    name = "hypersdk-demo-" + uuid.uuid4().hex[:6]
    result = subprocess.run([sys.executable, str(REPO / "scripts/demo.py"), "--name", name],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "completed" in result.stdout
    assert "boot verified after " in result.stdout  # the job log, from hyperctl logs
    assert "login:" in result.stdout.rsplit("serial console", 1)[-1]
    assert f"domain '{name}' defined" in result.stdout
    assert f"domain {name} removed again" in result.stdout
