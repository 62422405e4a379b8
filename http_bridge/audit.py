"""The audit log: one JSON line per mutating call or refused caller (who, what, when, result).

Lines are appended with a single write on an O_APPEND descriptor, so concurrent
calls never interleave; the write runs in a thread so a slow disk never blocks the
event loop. Tokens and request bodies are never written.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    async def record(self, *, who: str, role: str, remote: str, method: str, path: str,
                     status: int, result: str, target: str | None = None) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "who": who, "role": role, "remote": remote, "method": method, "path": path,
            "status": status, "result": result,
        }
        if target:
            entry["target"] = target
        line = (json.dumps(entry, ensure_ascii=True) + "\n").encode()
        try:
            await asyncio.to_thread(os.write, self._fd, line)
        except OSError as exc:  # the call itself already happened; say so loudly
            log.error("could not write the audit log %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        os.close(self._fd)
