"""Progress of one job: bytes done and total, a smoothed rate and an ETA.

The rate comes from a rolling window of (time, bytes) samples, as udisks does it: no
estimate until the window holds enough samples spread over enough time, so the
first seconds of a job show no wild numbers.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 10.0
MIN_SAMPLES = 3
MIN_SPAN_SECONDS = 1.0


@dataclass(frozen=True)
class ProgressSnapshot:
    bytes_done: int
    bytes_total: int
    rate: float  # bytes per second, 0 when unknown
    expected_end_usec: int  # microseconds since the epoch, 0 when unknown
    stage: str

    @property
    def valid(self) -> bool:
        return self.bytes_total > 0

    @property
    def fraction(self) -> float:
        if self.bytes_total <= 0:
            return 0.0
        return min(1.0, self.bytes_done / self.bytes_total)


class ProgressTracker:
    """Accumulates byte counts and derives rate and ETA; the clock is injectable for tests."""

    def __init__(self, clock=time.monotonic, wall_clock=time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._samples: deque[tuple[float, int]] = deque()
        self.bytes_done = 0
        self.bytes_total = 0
        self.stage = ""

    def set_total(self, total: int) -> None:
        self.bytes_total = max(0, int(total))

    def add_total(self, extra: int) -> None:
        self.bytes_total += max(0, int(extra))

    def set_stage(self, stage: str) -> None:
        self.stage = stage

    def advance(self, nbytes: int) -> None:
        self.update(self.bytes_done + nbytes)

    def update(self, bytes_done: int) -> None:
        self.bytes_done = max(0, int(bytes_done))
        now = self._clock()
        self._samples.append((now, self.bytes_done))
        while len(self._samples) > MIN_SAMPLES and now - self._samples[0][0] > WINDOW_SECONDS:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < MIN_SAMPLES:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_SPAN_SECONDS or b1 <= b0:
            return 0.0
        return (b1 - b0) / (t1 - t0)

    def snapshot(self) -> ProgressSnapshot:
        rate = self.rate()
        expected_end = 0
        remaining = self.bytes_total - self.bytes_done
        if rate > 0 and self.bytes_total > 0 and remaining >= 0:
            expected_end = int((self._wall_clock() + remaining / rate) * 1_000_000)
        return ProgressSnapshot(self.bytes_done, self.bytes_total, rate, expected_end, self.stage)
