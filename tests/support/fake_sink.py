"""The export sink a job context would be, for the provider tests (no engine behind it)."""
from __future__ import annotations


class FakeExportSink:
    """Collects what a job context would show (a test double for the job engine)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.total = 0
        self.done = 0

    def log(self, message: str, level: str = "info") -> None:
        self.lines.append(f"{level}: {message}")

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
