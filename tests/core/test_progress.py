"""The progress a job shows never falls, whatever its stages add to the total."""
from __future__ import annotations

from hypersdk.service.progress import ProgressTracker

GiB = 1 << 30


def run_ova_and_convert(tracker: ProgressTracker, capacity: int) -> list[float]:
    """The stages of an OVA export with auto_convert, as the export job reports them:
    each stage adds its bytes when it begins. Returns every fraction shown."""
    shown = []

    def stage(name: str, nbytes: int) -> None:
        tracker.set_stage(name)
        tracker.add_total(nbytes)
        for _ in range(4):
            tracker.advance(nbytes // 4)
            shown.append(tracker.snapshot().fraction)

    tracker.set_stage("discovery")
    stage("export", capacity // 2)  # a streamOptimized download: half the capacity
    stage("package", capacity // 2)  # the OVA written from it
    stage("convert", capacity)  # converted to qcow2
    return shown


def test_without_a_plan_the_fraction_holds_instead_of_falling():
    shown = run_ova_and_convert(ProgressTracker(), 8 * GiB)
    assert shown == sorted(shown) and shown[-1] == 1.0


def test_with_a_plan_the_fraction_rises_steadily_and_stages_release_what_they_did_not_use():
    tracker = ProgressTracker()
    tracker.plan({"export": 8 * GiB, "package": 8 * GiB, "convert": 8 * GiB})
    assert tracker.snapshot().bytes_total == 24 * GiB  # known from the start
    shown = run_ova_and_convert(tracker, 8 * GiB)
    assert shown == sorted(shown) and shown[-1] == 1.0
    # the first quarter of the download is 1 GiB of the 24 GiB the plan expects
    assert abs(shown[0] - 1 / 24) < 1e-9
    # no stall: every step of every stage moved the fraction up
    assert all(b > a for a, b in zip(shown, shown[1:]))


def test_an_estimate_too_low_grows_the_total_but_never_lowers_the_fraction():
    tracker = ProgressTracker()
    tracker.plan({"export": GiB})
    tracker.set_stage("export")
    tracker.add_total(GiB)
    tracker.advance(GiB)
    assert tracker.snapshot().fraction == 1.0
    tracker.add_total(3 * GiB)  # a disk the estimate did not know
    tracker.advance(GiB)
    snap = tracker.snapshot()
    assert snap.bytes_total == 4 * GiB and snap.fraction == 1.0
