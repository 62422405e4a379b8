"""A fake for the one thing this machine's filesystems do not do: refuse O_DIRECT."""
from __future__ import annotations

import errno
import os


def fake_refusing_o_direct(monkeypatch) -> list[int]:
    """Make os.open fail with EINVAL when asked for O_DIRECT, as filesystems without it
    do (ext4 and tmpfs here allow it). Returns the flags of the refused opens."""
    real_open = os.open
    refused: list[int] = []

    def refusing_open(path, flags, mode=0o777, **kwargs):
        if flags & os.O_DIRECT:
            refused.append(flags)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    return refused
