"""How much of a file sits in the page cache: the visible trace of O_DIRECT writes."""
from __future__ import annotations

import subprocess
from pathlib import Path


def cached_bytes(path: Path) -> int:
    """Bytes of `path` resident in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.strip())
