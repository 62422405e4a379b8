"""Benchmark: submitting and claiming jobs in the store, SQLite against PostgreSQL.

For each engine (SQLite in a temporary file; PostgreSQL: a real server from Debian's
packages on a private unix socket, tests/support/postgres.py), through the Store API:

- submit: --jobs insert_job calls, one transaction each (as JobEngine.submit does);
- claim: the same jobs taken by claim_pending(1) from one store, then again (after a
  fresh submit) by two stores on the same database in two threads, and by two
  processes, as two hypervisords would; every job must be claimed exactly once;
- blocking: how long one call the engine makes on its event loop takes (the store is
  synchronous): a claim, a heartbeat (renew_lease), and the fleet's look at the
  unfinished jobs (service/fleet.py), with 200 jobs unfinished, median and 99th
  percentile in milliseconds.

    .venv/bin/python bench/store.py [--jobs 2000]

Prints jobs per second, the PostgreSQL/SQLite ratios, two processes against one, and
the blocking times. The machine is shared: noisy.
The test server runs with fsync off (SQLite: WAL, synchronous=NORMAL, which syncs only at
checkpoints): commit latency on real disks is not what this measures.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypersdk.service.store import JobRecord, Store, open_store  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402


def submit(store: Store, count: int, prefix: str) -> float:
    """Jobs per second of `count` insert_job calls."""
    began = time.perf_counter()
    for number in range(count):
        store.insert_job(JobRecord(id=f"{prefix}-{number}", kind="sleep", status="pending",
                                   definition={"steps": 1}, created_at=time.time()))
    return count / (time.perf_counter() - began)


def _claim_all(store: Store) -> list[str]:
    claimed = []
    while jobs := store.claim_pending():
        claimed.extend(job.id for job in jobs)
    return claimed


def claim(stores: list[Store], count: int) -> float:
    """Jobs per second claimed by `stores` in parallel threads; checks none is taken twice."""
    began = time.perf_counter()
    with ThreadPoolExecutor(len(stores)) as pool:
        claimed = [job for part in pool.map(_claim_all, stores) for job in part]
    elapsed = time.perf_counter() - began
    if len(claimed) != count or len(set(claimed)) != count:
        raise SystemExit(f"claimed {len(claimed)} ({len(set(claimed))} distinct) of {count}")
    return count / elapsed


UNFINISHED = 200  # pending or running jobs in the fleet while blocking times are measured


def _claim_in_process(url: str, start, out) -> None:
    """A child process: claim every pending job through a store of its own."""
    store = open_store(url)
    start.wait()
    began = time.perf_counter()
    claimed = _claim_all(store)
    out.put((began, time.perf_counter(), claimed))
    store.close()


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
    claimed = [job for _, _, part in results for job in part]
    if len(claimed) != count or len(set(claimed)) != count:
        raise SystemExit(f"claimed {len(claimed)} ({len(set(claimed))} distinct) of {count}")
    return count / (max(end for _, end, _ in results) - min(began for began, _, _ in results))


def blocking(store: Store, count: int) -> dict[str, tuple[float, float]]:
    """(median, 99th percentile) milliseconds of one call of each kind the event loop
    makes, while `count` jobs are unfinished (each claimed on the way)."""
    calls = {"claim": lambda: store.claim_pending(1, "bench"),
             "heartbeat": lambda: store.renew_lease("bench", 30.0),
             "fleet look": store.unfinished_jobs}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - began) * 1000)
    return {name: (statistics.median(values), statistics.quantiles(values, n=100)[98])
            for name, values in times.items()}


def measure(url: str, count: int) -> tuple[dict[str, float], dict]:
    stores = [open_store(url) for _ in range(2)]
    results = {"submit": submit(stores[0], count, "a"),
               "claim, one store": claim(stores[:1], count)}
    submit(stores[0], count, "b")
    results["claim, two stores"] = claim(stores, count)
    for processes in (1, 2):
        submit(stores[0], count, f"p{processes}")
        results[f"claim, {processes} process(es)"] = claim_processes(url, processes, count)
    stores[0].execute("UPDATE jobs SET status='completed' WHERE status='running'")
    submit(stores[0], UNFINISHED, "c")
    blocked = blocking(stores[0], UNFINISHED)
    for store in stores:
        store.close()
    return results, blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        sqlite, sqlite_blocked = measure(f"sqlite://{scratch}/jobs.db", args.jobs)
    server = PostgresServer.start(Path(tempfile.mkdtemp(prefix="bench-pg-")))
    try:
        postgres, postgres_blocked = measure(server.new_database(), args.jobs)
    finally:
        server.stop()
    print(f"{'jobs/s':<24}{'SQLite':>10}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    for name, value in sqlite.items():
        print(f"{name:<24}{value:>10.0f}{postgres[name]:>12.0f}{postgres[name] / value:>11.2f}")
    for engine, results in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        ratio = results["claim, 2 process(es)"] / results["claim, 1 process(es)"]
        print(f"{engine}: claims/s with two processes / one: {ratio:.2f}")
    print(f"{'loop blocked, ms':<24}{'SQLite p50/p99':>18}{'PostgreSQL p50/p99':>22}")
    for name, (median, p99) in sqlite_blocked.items():
        pg_median, pg_p99 = postgres_blocked[name]
        print(f"{name:<24}{median:>9.3f}/{p99:<8.3f}{pg_median:>13.3f}/{pg_p99:<8.3f}")


if __name__ == "__main__":
    main()
