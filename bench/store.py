"""Benchmark: submitting and claiming jobs in the store, SQLite against PostgreSQL, and
how long the store keeps the event loop from running anything else.

For each engine (SQLite in a temporary file; PostgreSQL: a real server from Debian's
packages on a private unix socket, tests/support/postgres.py), through the Store API:

- submit: --jobs insert_job calls, one transaction each (as JobEngine.submit does);
- claim: the same jobs taken by claim_pending(1) from one store, then again (after a
  fresh submit) by two stores on the same database in two coroutines, and by two
  processes, as two hypervisords would; every job must be claimed exactly once;
- calls: how long one call the engine makes takes (awaited: the caller waits, the event
  loop does not), with 200 jobs unfinished: a claim, a heartbeat (renew_lease) and the
  fleet's look at the unfinished jobs (service/fleet.py), median and 99th percentile in
  milliseconds;
- loop stalls: while those calls run (the loop's other work getting its turn between
  them), a ticker coroutine asks to wake every millisecond and records how late it
  wakes: the longest and the 99th percentile lateness is what the store kept everything
  else on the loop (D-Bus, the bridge's calls, running jobs' progress) waiting. Before
  the store was async, a PostgreSQL call held the loop for all of its time; now only
  SQLite's calls (a local file) do.

    .venv/bin/python bench/store.py [--jobs 2000]

Prints jobs per second, the PostgreSQL/SQLite ratios, two processes against one, the
call times and the loop's stalls. The machine is shared: noisy. The test server runs
with fsync off (SQLite: WAL, synchronous=NORMAL, which syncs only at checkpoints):
commit latency on real disks is not what this measures.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypersdk.service.store import JobRecord, Store, open_store  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

UNFINISHED = 200  # pending or running jobs in the fleet while calls and stalls are measured
TICK = 0.001  # the ticker's period, seconds


async def submit(store: Store, count: int, prefix: str) -> float:
    """Jobs per second of `count` insert_job calls."""
    began = time.perf_counter()
    for number in range(count):
        await store.insert_job(JobRecord(id=f"{prefix}-{number}", kind="sleep",
                                         status="pending", definition={"steps": 1},
                                         created_at=time.time()))
    return count / (time.perf_counter() - began)


async def _claim_all(store: Store) -> list[str]:
    claimed = []
    while jobs := await store.claim_pending():
        claimed.extend(job.id for job in jobs)
    return claimed


def _check(claimed: list[str], count: int) -> None:
    if len(claimed) != count or len(set(claimed)) != count:
        raise SystemExit(f"claimed {len(claimed)} ({len(set(claimed))} distinct) of {count}")


async def claim(stores: list[Store], count: int) -> float:
    """Jobs per second claimed by `stores` in coroutines of their own; checks none is
    taken twice."""
    began = time.perf_counter()
    parts = await asyncio.gather(*(_claim_all(store) for store in stores))
    elapsed = time.perf_counter() - began
    _check([job for part in parts for job in part], count)
    return count / elapsed


def _claim_in_process(url: str, start, out) -> None:
    """A child process: claim every pending job through a store of its own."""
    async def run() -> None:
        store = await open_store(url)
        start.wait()
        began = time.perf_counter()
        claimed = await _claim_all(store)
        out.put((began, time.perf_counter(), claimed))
        await store.close()
    asyncio.run(run())


def claim_processes(url: str, processes: int, count: int) -> float:
    """Jobs per second claimed by `processes` processes (each its own connection, as
    hypervisords on several hosts); from the first start to the last end."""
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(processes), context.Queue()
    children = [context.Process(target=_claim_in_process, args=(url, start, out))
                for _ in range(processes)]
    for child in children:
        child.start()
    results = [out.get() for _ in children]
    for child in children:
        child.join()
    _check([job for _, _, part in results for job in part], count)
    return count / (max(end for _, end, _ in results) - min(began for began, _, _ in results))


def _p50_p99(values: list[float]) -> tuple[float, float]:
    return (statistics.median(values),
            statistics.quantiles(values, n=100, method="inclusive")[98])


async def calls_and_stalls(store: Store, count: int) -> tuple[dict, tuple[float, float]]:
    """(median, 99th percentile) milliseconds of each call the engine makes, `count`
    times each with `count` jobs unfinished (each claimed on the way); and (longest,
    99th percentile) milliseconds the event loop stalled meanwhile."""
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "claim": lambda: store.claim_pending(1, "bench"),
        "heartbeat": lambda: store.renew_lease("bench", 30.0),
        "fleet look": store.unfinished_jobs}
    times: dict[str, list[float]] = {name: [] for name in calls}
    lateness: list[float] = []
    working = True

    async def ticker() -> None:
        while working:
            asked = time.perf_counter()
            await asyncio.sleep(TICK)
            lateness.append((time.perf_counter() - asked - TICK) * 1000)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(TICK * 5)  # the ticker is going
    for _ in range(count):
        for name, call in calls.items():
            began = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - began) * 1000)
            # the loop's other work gets its turn between calls, as between the engine's
            # (a run of SQLite calls never waits, so it would hold the loop throughout)
            await asyncio.sleep(0)
    working = False
    await ticking
    return ({name: _p50_p99(values) for name, values in times.items()},
            (max(lateness), _p50_p99(lateness)[1]))


async def measure(url: str, count: int) -> tuple[dict[str, float], dict, tuple]:
    stores = [await open_store(url) for _ in range(2)]
    results = {"submit": await submit(stores[0], count, "a"),
               "claim, one store": await claim(stores[:1], count)}
    await submit(stores[0], count, "b")
    results["claim, two stores"] = await claim(stores, count)
    for processes in (1, 2):
        await submit(stores[0], count, f"p{processes}")
        results[f"claim, {processes} process(es)"] = await asyncio.to_thread(
            claim_processes, url, processes, count)
    await stores[0].execute("UPDATE jobs SET status='completed' WHERE status='running'")
    await submit(stores[0], UNFINISHED, "c")
    timed, stalls = await calls_and_stalls(stores[0], UNFINISHED)
    for store in stores:
        await store.close()
    return results, timed, stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        sqlite = asyncio.run(measure(f"sqlite://{scratch}/jobs.db", args.jobs))
    server = PostgresServer.start(Path(tempfile.mkdtemp(prefix="bench-pg-")))
    try:
        postgres = asyncio.run(measure(server.new_database(), args.jobs))
    finally:
        server.stop()
    print(f"{'jobs/s':<24}{'SQLite':>10}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    for name, value in sqlite[0].items():
        pg = postgres[0][name]
        print(f"{name:<24}{value:>10.0f}{pg:>12.0f}{pg / value:>11.2f}")
    for engine, (results, _, _) in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        ratio = results["claim, 2 process(es)"] / results["claim, 1 process(es)"]
        print(f"{engine}: claims/s with two processes / one: {ratio:.2f}")
    print(f"{'call, ms':<24}{'SQLite p50/p99':>18}{'PostgreSQL p50/p99':>22}")
    for name, (median, p99) in sqlite[1].items():
        pg_median, pg_p99 = postgres[1][name]
        print(f"{name:<24}{median:>9.3f}/{p99:<8.3f}{pg_median:>13.3f}/{pg_p99:<8.3f}")
    print(f"{'loop stalled, ms':<24}{'SQLite max/p99':>18}{'PostgreSQL max/p99':>22}")
    (longest, p99), (pg_longest, pg_p99) = sqlite[2], postgres[2]
    print(f"{'while calling':<24}{longest:>9.3f}/{p99:<8.3f}{pg_longest:>13.3f}/{pg_p99:<8.3f}")


if __name__ == "__main__":
    main()
