"""Several hypervisords sharing one database (`database.url: postgresql://...`).

Each instance (`daemon.instance`, the host name by default) claims pending jobs from the
store (engine.py) and, here, every `database.poll_interval`:

- renews its lease (`database.lease_seconds`) every third of it: a heartbeat;
- takes over the running jobs of an instance whose lease ran out (it stopped answering:
  killed, crashed, cut off). Each such job is ended `failed`, its error and history
  saying which instance stopped answering, when it was last heard of and who recovered
  it, and is run again here as a new job (`RetryOf` the old one): the dead host's
  staging is not reachable from here. The ending is a conditional UPDATE (still
  running, on that instance), so exactly one instance recovers each job, and the dead
  instance's own restart leaves it alone (it only removes what the job made on its
  disk: engine.recover). Before the retry, the domains and volumes the job made on a
  target host (a libvirt URI naming a host, reached from every instance) are removed
  from here, so the retry finds their names free (job_output.remove_from_shared_hosts);
- stops its running jobs that another instance recovered while this one did not
  answer (a pause, a network cut longer than the lease), removing what they made here
  and leaving their records to the recoverer; and stops them by itself when its lease
  runs out unrenewed (the store does not answer: a hung server, a cut to it), since
  another instance recovers them then;
- cancels its running jobs that a user cancelled on another instance (a flag in the
  store, Store.request_cancel);
- wakes its workers for jobs submitted elsewhere;
- announces what other instances did to jobs (new jobs, status, saved progress) to its
  listeners as events with `local=False`, so that its D-Bus API shows the whole fleet.

Why polling and not LISTEN/NOTIFY: the store has one connection per instance, SQLite
has no notifications, and one short indexed query per interval is cheap; a job
submitted on this instance still starts at once (JobEngine.submit wakes the workers).
Leases are measured by the database's clock (Store.NOW), so hosts' clocks may differ.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

from .engine import JobEngine, JobEvent, new_job_id
from .errors import HyperSDKError, NotFound
from .job_output import remove_from_shared_hosts
from .store import JobRecord

log = logging.getLogger(__name__)


def _shown(job: JobRecord) -> tuple:
    """What another instance's change to a job makes worth announcing."""
    return (job.status, job.instance, job.stage, job.bytes_done, job.bytes_total,
            job.attempts)


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="seconds")


class Fleet:
    """This instance's part in the fleet; see the module docstring. Create it before the
    D-Bus objects are exported and start it after the engine."""

    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine
        self.store = engine.store
        self.instance = engine.instance
        settings = engine.config.database
        self.lease = settings.lease_seconds
        self.poll = settings.poll_interval
        self._next_beat = 0.0
        # unfinished jobs as listeners last heard of them, by id
        self._shown: dict[str, tuple] = {}
        self._task: asyncio.Task | None = None
        self._lease_end: asyncio.TimerHandle | None = None  # the lease runs out unrenewed
        self._stopped: set[str] = set()  # jobs stopped then, their ending not yet recorded
        # called with the name of each instance whose lease ran out, after its jobs were
        # recovered (plans.Plans.take_over), at every look while it stays silent
        self.on_instance_lost: list[Callable[[str], Awaitable[None]]] = []
        engine.subscribe(self._heard)

    def _heard(self, event: JobEvent) -> None:
        if event.type in ("created", "status", "progress"):
            self._shown[event.job.id] = _shown(event.job)
        if event.job.finished or event.type == "removed":
            self._shown.pop(event.job.id, None)

    async def start(self) -> None:
        for job in await self.store.unfinished_jobs():
            self._shown.setdefault(job.id, _shown(job))
        self._task = asyncio.create_task(self._run(), name="fleet")

    async def stop(self) -> None:
        if self._lease_end is not None:
            self._lease_end.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except self.store.errors as exc:  # a lost database: try again next time
                log.warning("fleet: the store did not answer: %s", exc)
            except Exception:
                log.exception("fleet: tick failed")
            await asyncio.sleep(self.poll)

    async def tick(self) -> None:
        if time.monotonic() >= self._next_beat:
            await self._renew()
            recovered = await self.store.recovered_from(self.instance, self.engine.running_ids)
            for job_id, recoverer in recovered.items():
                self.engine.cancel_running(job_id, recoverer, reason="lost")
            await self.take_over()
        for job_id, asked_on in (await self.store.cancels_requested(self.instance)).items():
            self.engine.cancel_running(job_id, asked_on)
        await self.follow()
        self.engine.wake()

    # -- this instance's lease ---------------------------------------------------------
    async def _renew(self) -> None:
        """Renew the lease; on a store others share, stop this instance's running jobs
        when it runs out unrenewed (the store did not answer): another instance recovers
        them then, and must not find them still running here."""
        asked = time.monotonic()  # the lease counts from no earlier than now
        await self.store.renew_lease(self.instance, self.lease)
        self._next_beat = time.monotonic() + self.lease / 3
        if self.store.SHARED:
            if self._lease_end is not None:
                self._lease_end.cancel()
            self._lease_end = asyncio.get_running_loop().call_later(
                self.lease - (time.monotonic() - asked), self._lease_ran_out)
        if self._stopped:  # no other instance may have recovered them: end them here
            stopped, self._stopped = self._stopped, set()
            await self.engine.end_abandoned(stopped, f"instance {self.instance}'s lease ran "
                                            f"out (the job store did not answer for "
                                            f"{self.lease:g}s) and no other instance "
                                            "recovered the job")

    def _lease_ran_out(self) -> None:
        self._lease_end = None
        log.warning("fleet: the lease of instance %s ran out unrenewed (the job store did "
                    "not answer): its running jobs stop, for another instance to recover",
                    self.instance)
        for job_id in self.engine.running_ids:
            if self.engine.cancel_running(job_id, self.instance, reason="lease"):
                self._stopped.add(job_id)

    # -- instances that stopped answering ----------------------------------------------
    async def take_over(self) -> None:
        for name, heartbeat in await self.store.expired_instances(self.instance):
            for job in await self.store.running_on((name,)):
                await self._recover(job, heartbeat)
            for callback in self.on_instance_lost:
                await callback(name)

    async def _recover(self, job: JobRecord, heartbeat: float) -> None:
        """End `job` (its instance stopped answering) and run it again here, when its
        definition is valid here (the same paths and providers on every instance). The
        retry exists before the ending is announced: a listener following the job (a
        plan) finds it."""
        dead = job.instance
        try:
            self.engine.validate(job.kind, job.definition)
            retry_id, again = new_job_id(), "runs it again as "
        except HyperSDKError as exc:
            retry_id, again = "", f"cannot run it again here: {exc}"
        job.status, job.finished_at, job.recovered_by = "failed", time.time(), self.instance
        job.error = (f"interrupted: instance {dead} stopped answering (last heartbeat "
                     f"{_iso(heartbeat)}, lease {self.lease:g}s); instance {self.instance} "
                     f"recovered the job and {again}{retry_id}")
        if not await self.store.end_if(job, "running", reason=f"recovered by {self.instance}:"
                                       f" {dead} stopped answering"):
            return  # another instance, or the dead one restarting, was first
        log.warning("job %s: %s", job.id, job.error)
        await self.engine.append_log(job, job.error, "error")
        removed, left = await remove_from_shared_hosts(self.store, job.id)
        for line in removed:
            await self.engine.append_log(job, f"{self.instance}: {line}")
        for line in left:
            await self.engine.append_log(job, f"{self.instance}: {line}", "warning")
        if retry_id:
            await self.engine.submit(job.kind, job.definition, job.started_by_uid,
                                     retry_of=job.id, requested_by=job.requested_by,
                                     job_id=retry_id)
        self.engine.notify(JobEvent("status", job))

    # -- the fleet's jobs on this instance's bus -----------------------------------------
    async def follow(self) -> None:
        """Announce what other instances did to jobs since the last look."""
        current = {job.id: job for job in await self.store.unfinished_jobs()}
        for job_id in set(self._shown) - set(current):  # ended (or pruned) elsewhere
            try:
                current[job_id] = await self.store.get_job(job_id)
            except NotFound:
                self._announce("removed", self._removed(job_id))
        for job in current.values():
            if job.id in self.engine.running_ids:
                continue  # this instance announces its own
            before = self._shown.get(job.id)
            if before is None:
                self._announce("created", job)
            if before is None and job.status == "pending":
                continue
            if before is None or before[0] != job.status or before[1] != job.instance:
                self._announce("status", job)
            elif before != _shown(job):
                self._announce("progress", job)

    def _announce(self, kind: str, job: JobRecord) -> None:
        self.engine.notify(JobEvent(kind, job, local=False))

    @staticmethod
    def _removed(job_id: str) -> JobRecord:
        return JobRecord(id=job_id, kind="", status="completed", definition={})
