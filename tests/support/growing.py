"""A growing file (a download still under way) whose decoder a test can wait for."""
from __future__ import annotations

import threading

from hypersdk.service.disks.streamopt import GrowingFile


class WatchedGrowingFile(GrowingFile):
    """The real GrowingFile that also tells (`waiting`) while the decoder waits for bytes
    beyond those that have landed: a test acts on that instead of after a delay."""

    def __init__(self) -> None:
        super().__init__()
        self.landed = 0
        self.wanted = -1  # the offset the decoder last waited to see
        self.waiting = threading.Event()
        self._lock = threading.Lock()

    def grew(self, size: int) -> None:
        with self._lock:
            if size > self.wanted:  # the decoder, if waiting, goes on
                self.waiting.clear()
            self.landed = max(self.landed, size)
        super().grew(size)

    def wait_beyond(self, offset: int, stop: threading.Event | None) -> bool:
        with self._lock:
            if offset >= self.landed:
                self.wanted = offset
                self.waiting.set()
        return super().wait_beyond(offset, stop)

    def decoder_caught_up(self) -> None:
        """Until the decoder has taken what landed and waits for more."""
        assert self.waiting.wait(60), f"the decoder never caught up with {self.landed} bytes"
