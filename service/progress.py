"""Progress of one job: bytes done and total, a smoothed rate and an ETA.

The rate comes from a rolling window of (time, bytes) samples, as udisks does it: no
estimate until the window holds enough samples spread over enough time, so the
first seconds of a job show no wild numbers.

Stages add their bytes to the total as they learn them (a download its file sizes, a
conversion its disks' capacity), which alone would make the percentage fall each time
a stage begins. So a job states its plan when it starts (`plan`: estimated bytes per
stage still to come); the estimates count in the total at once, a stage's own
`add_total` uses up its estimate, and what a finished stage did not use is released
(the percentage only rises). Where an estimate was too low the total grows; the
percentage shown still never falls.
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
    bytes_total: int  # including what the plan still expects
    rate: float  # bytes per second, 0 when unknown
    expected_end_usec: int  # microseconds since the epoch, 0 when unknown
    stage: str
    fraction: float  # 0..1, never below an earlier snapshot of the same run

    @property
    def valid(self) -> bool:
        return self.bytes_total > 0


def done_fraction(bytes_done: int, bytes_total: int) -> float:
    return min(1.0, bytes_done / bytes_total) if bytes_total > 0 else 0.0


class ProgressTracker:
    """Accumulates byte counts and derives rate and ETA; the clock is injectable for tests."""

    def __init__(self, clock=time.monotonic, wall_clock=time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._samples: deque[tuple[float, int]] = deque()
        self.bytes_done = 0
        self.bytes_total = 0  # what the stages have added
        self.stage = ""
        self._expected: dict[str, int] = {}  # stage -> planned bytes not added yet
        self._best = 0.0

    def plan(self, stages: dict[str, int]) -> None:
        """The bytes each coming stage is expected to add (module docstring)."""
        self._expected = {stage: max(0, int(n)) for stage, n in stages.items()}

    def set_total(self, total: int) -> None:
        self.bytes_total = max(0, int(total))

    def add_total(self, extra: int) -> None:
        extra = max(0, int(extra))
        expected = self._expected.get(self.stage, 0)
        self._expected[self.stage] = expected - min(expected, extra)
        self.bytes_total += extra

    def set_stage(self, stage: str) -> None:
        if stage != self.stage:
            self._expected.pop(self.stage, None)  # a finished stage's unused estimate
        self.stage = stage

    @property
    def total_shown(self) -> int:
        return self.bytes_total + sum(self._expected.values())

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
        total = self.total_shown
        expected_end = 0
        remaining = total - self.bytes_done
        if rate > 0 and total > 0 and remaining >= 0:
            expected_end = int((self._wall_clock() + remaining / rate) * 1_000_000)
        self._best = max(self._best, done_fraction(self.bytes_done, total))
        return ProgressSnapshot(self.bytes_done, total, rate, expected_end, self.stage,
                                self._best)
