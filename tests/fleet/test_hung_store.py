"""A hypervisord on a PostgreSQL server that stops answering (every server process
stopped with SIGSTOP, as a hung server or a cut network looks from the client): the
daemon's event loop never waits on the database (service/pgstore.py), so the bus keeps
answering what needs no store at once, store calls fail after database.statement_timeout
with an error saying so, and once the server answers again the daemon carries on."""
from __future__ import annotations

from hypersdk.client.names import job_path
from tests.support.cli import BUS_NAME, MANAGER, MANAGER_IFACE, busctl, wait_for_status
from tests.support.fleet import Fleet, tally_job
from tests.support.wait import wait_for_value, wait_until

STATEMENT_TIMEOUT = 3  # seconds
QUICK = 1.5  # seconds within which a call needing no store must answer (< STATEMENT_TIMEOUT)


def _list_records(address: str, timeout: float = 30):
    return busctl(address, "--timeout", str(timeout), "call", BUS_NAME, MANAGER,
                  MANAGER_IFACE, "ListJobRecords", "a{sv}", "0", check=False, timeout=60)


def test_a_hung_database_leaves_the_bus_answering_and_store_calls_failing_then_carrying_on(
        fleet: Fleet, postgres):
    a = fleet.start("a", database={"statement_timeout": f"{STATEMENT_TIMEOUT}s",
                                   "connect_timeout": "2s", "lease_seconds": "120s"})
    job_id = a.submit("tally", tally_job(fleet, steps=80, interval=0.1))
    path = job_path(job_id)
    wait_for_status(a.address, path, {"running"})
    wait_until(lambda: (job_id, "a") in fleet.tally(), what="the job's code running")
    with postgres.hung():
        # the job's properties come from what the daemon holds, and Ping from the
        # library: both answer while the database does not
        status = busctl(a.address, "--timeout", str(QUICK), "get-property", BUS_NAME, path,
                        "org.hypersdk.HyperSDK1.Job", "Status", timeout=10)
        assert status.stdout.split() == ["s", '"running"']
        busctl(a.address, "--timeout", str(QUICK), "call", BUS_NAME, "/",
               "org.freedesktop.DBus.Peer", "Ping", timeout=10)
        refused = _list_records(a.address)
        assert refused.returncode != 0
        # the call that waited on the server, or one after it (the connection given up on,
        # connecting again fails): either names the setting that ended it
        assert "the job store is unavailable" in refused.stderr, refused.stderr
        assert (f"database.statement_timeout ({STATEMENT_TIMEOUT}s)" in refused.stderr
                or "(database.connect_timeout is 2s)" in refused.stderr), refused.stderr
        assert "Traceback" not in a.daemon.log(), a.daemon.log()
    # the server answers again: the same daemon, no restart, reads and finishes
    records = wait_for_value(lambda: _list_records(a.address), lambda r: r.returncode == 0,
                             60, "ListJobRecords to answer again")
    assert job_id in records.stdout
    assert wait_for_status(a.address, path, {"completed", "failed"}, timeout=60) == "completed"
    [job] = [job for job in fleet.jobs() if job.id == job_id]
    assert (job.status, job.result) == ("completed", {"instance": "a"})


def test_an_instance_whose_lease_runs_out_unrenewed_stops_its_jobs_and_ends_them_after(
        fleet: Fleet, postgres):
    """While the database does not answer, the instance cannot renew its lease; once it
    runs out, another instance may recover its jobs, so it stops them itself (what they
    made removed), and when the database answers again it ends them (none recovered them
    here: it is alone)."""
    a = fleet.start("a", database={"statement_timeout": "1s", "connect_timeout": "2s",
                                   "lease_seconds": "4s"})
    job_id = a.submit("tally", tally_job(fleet, steps=600, interval=0.1))
    path = job_path(job_id)
    wait_for_status(a.address, path, {"running"})
    wait_until(lambda: (job_id, "a") in fleet.tally(), what="the job's code running")
    with postgres.hung():
        wait_until(lambda: "lease of instance a ran out unrenewed" in a.daemon.log(),
                   timeout=30, what="the lease to run out")
        wait_until(lambda: f"job {job_id}: this instance's lease ran out" in a.daemon.log(),
                   what="the job stopped")
    assert wait_for_status(a.address, path, {"failed"}, timeout=60) == "failed"
    [job] = [job for job in fleet.jobs() if job.id == job_id]
    assert job.error.startswith("interrupted: instance a's lease ran out (the job store did "
                                "not answer for 4s) and no other instance recovered the job")
    assert fleet.tally() == [(job_id, "a")]  # stopped, not run again
