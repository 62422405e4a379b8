"""What the tests check of a job's staging directories (service/staging.py)."""
from __future__ import annotations

import stat
from pathlib import Path

STAGING_PREFIX = ".hypersdk-staging-"


def assert_only_private_staging_left(directory: Path) -> None:
    """Nothing of an interrupted job is visible in `directory`: it holds only the job's
    staging directory (root's, mode 0700) with the downloads kept for a resume."""
    entries = list(directory.iterdir())
    assert [entry.name[:len(STAGING_PREFIX)] for entry in entries] == [STAGING_PREFIX], entries
    info = entries[0].stat()
    assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o700
