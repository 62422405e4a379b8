"""`make demo` is the spec's Pattern 1 through the real service and CLI: keep it working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_demo_exports_converts_imports_and_boots_the_vm():
    result = subprocess.run([sys.executable, str(REPO / "scripts/demo.py")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "completed" in result.stdout
    assert "HYPERSDK BOOT OK" in result.stdout
    assert "domain 'hypersdk-demo' defined" in result.stdout
