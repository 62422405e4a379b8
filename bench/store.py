"""Benchmark: submitting and claiming jobs in the store, SQLite against PostgreSQL.

For each engine (SQLite in a temporary file; PostgreSQL: a real server from Debian's
packages on a private unix socket, tests/support/postgres.py), through the Store API:

- submit: --jobs insert_job calls, one transaction each (as JobEngine.submit does);
- claim: the same jobs taken by claim_pending(1) from one store, then again (after a
  fresh submit) by two stores on the same database in two threads, as two hypervisords
  would; every job must be claimed exactly once.

    .venv/bin/python bench/store.py [--jobs 2000]

Prints jobs per second and the PostgreSQL/SQLite ratios. The machine is shared: noisy.
The test server runs with fsync off (SQLite: WAL, synchronous=NORMAL, which syncs only at
checkpoints): commit latency on real disks is not what this measures.
"""
from __future__ import annotations

import argparse
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


def measure(url: str, count: int) -> dict[str, float]:
    stores = [open_store(url) for _ in range(2)]
    results = {"submit": submit(stores[0], count, "a"),
               "claim, one store": claim(stores[:1], count)}
    submit(stores[0], count, "b")
    results["claim, two stores"] = claim(stores, count)
    for store in stores:
        store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        sqlite = measure(f"sqlite://{scratch}/jobs.db", args.jobs)
    server = PostgresServer.start(Path(tempfile.mkdtemp(prefix="bench-pg-")))
    try:
        postgres = measure(server.new_database(), args.jobs)
    finally:
        server.stop()
    print(f"{'jobs/s':<20}{'SQLite':>10}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    for name, value in sqlite.items():
        print(f"{name:<20}{value:>10.0f}{postgres[name]:>12.0f}{postgres[name] / value:>11.2f}")


if __name__ == "__main__":
    main()
