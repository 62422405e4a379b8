"""The job engine: a persistent queue, a worker pool, cancel, retries and progress.

Jobs are rows in the store first and tasks second, so nothing is lost on a crash. The
queue is the store itself: a worker claims the oldest pending job (Store.claim_pending),
which records this instance (`daemon.instance`) as the one running it, so several
hypervisords sharing a database each run a job once (fleet.py: leases, cancels and
the jobs of an instance that stopped answering). A submit here wakes the workers at
once; jobs submitted elsewhere are found every `database.poll_interval`.

Recovery rule at start (documented in the README): a job this instance left `running`
was interrupted by a crash or kill; it is marked `failed` with the reason
"interrupted: ..." (re-running an export silently could shut a VM down twice) and the
user may retry it; what it made is removed, except downloads with verified checkpoints,
which its retry resumes (job_output.py; `export.resume_on_start` retries such jobs at
once). Jobs of other instances are not touched here. On SIGTERM the engine stops taking
work, cancels running jobs (their partial files are removed or kept for a resume alike)
and marks them failed "interrupted by service shutdown; ...".
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from .config import Config
from .confine import OpenDir
from .errors import Failed, HyperSDKError, InvalidArgument, NotFound, Retryable
from .job_kinds import JobKind, get_kind, kind_names
from .progress import ProgressSnapshot, ProgressTracker, done_fraction
from .providers.registry import ProviderRegistry
from .job_output import JobOutput, StoreCheckpoints, remove_leftovers
from .jobs import warm
from .staging import Staging
from .store import JobRecord, LogLine, Store

log = logging.getLogger(__name__)
MAX_LOG_MESSAGE = 4096  # characters of one log line

PROGRESS_SAVE_INTERVAL = 1.0
RETRY_BACKOFF_BASE = 2.0
RETRY_BACKOFF_MAX = 60.0
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class JobEvent:
    """What listeners (D-Bus objects, webhooks, schedules) hear about a job.

    type: created | status | progress | log | removed (pruned: database.retention_*)
    local: False for what another instance did, seen in the shared store (fleet.py):
    shown on the bus, but its own instance fires the webhooks and settles the backups
    """

    type: str
    job: JobRecord
    line: LogLine | None = None
    local: bool = True


# a listener returning a coroutine (one that writes the store, say) has it run in a
# task of its own, in the order of the events (JobEngine.notify)
Listener = Callable[[JobEvent], Awaitable[None] | None]


class RunningJob:
    """The JobContext a kind sees while it runs."""

    def __init__(self, engine: "JobEngine", record: JobRecord, kind: JobKind) -> None:
        self.engine = engine
        self.record = record
        self.kind = kind
        self.job_id = record.id
        self.definition = record.definition
        self.config = engine.config
        self.providers = engine.providers
        self.tracker = ProgressTracker()
        self.task: asyncio.Task | None = None
        self.cancel_reason = ""  # user | shutdown | lost | lease (fleet.py) | store
        self.cancel_asked_on = ""  # the instance a user's cancel came from
        self.store_failure: Exception | None = None  # why a write of the job's failed
        self._writes: set[asyncio.Task] = set()  # watched writes under way
        self.ended = asyncio.Event()  # its ending is recorded (or could not be)
        self.cutover = asyncio.Event()  # a warm export's Cutover call (jobs/warm.py)
        self.output = JobOutput(engine.store, record.id, engine.config.export.checkpoint_interval,
                                self.log, self.write)
        self._loop = asyncio.get_running_loop()
        self._last_save = 0.0

    # -- JobContext ------------------------------------------------------------------
    @property
    def attempt(self) -> int:
        return self.record.attempts

    def log(self, message: str, level: str = "info") -> None:
        if _on_event_loop():
            self.watch(self.engine.append_log(self.record, message, level))
        else:  # a worker thread: the line follows, in order, on the loop
            self._loop.call_soon_threadsafe(self.log, message, level)

    def write(self, call: Callable[..., Awaitable[object]], *args: object) -> None:
        """`call(*args)`, a store call of the job's code, which does not await: on the
        event loop, written in its turn (Store.soon); from a worker thread (a file landed
        in asyncio.to_thread), written before this returns, a refusal raised there."""
        if not _on_event_loop():
            asyncio.run_coroutine_threadsafe(self._write_now(call, *args), self._loop).result()
            return
        self.watch(self.engine.store.soon(call, *args))

    async def _write_now(self, call: Callable[..., Awaitable[object]], *args: object) -> None:
        written = self.engine.store.soon(call, *args)
        self.watch(written)
        await written

    def watch(self, written: asyncio.Task) -> None:
        """A write the job's code made without awaiting it (Store.soon): should the store
        refuse it (a full disk), the job fails, as it would had it awaited the write."""
        self._writes.add(written)
        written.add_done_callback(self._written)

    async def settle(self) -> None:
        """Wait for the job's writes still under way (before it is recorded as ended)."""
        await asyncio.gather(*self._writes, return_exceptions=True)

    def _written(self, write: asyncio.Task) -> None:
        self._writes.discard(write)
        refused = None if write.cancelled() else write.exception()
        if not isinstance(refused, self.engine.store.errors) or self.store_failure:
            return
        self.store_failure = refused
        if self.task is not None and not self.task.done():
            self.cancel_reason = "store"
            self.task.cancel()

    def set_stage(self, stage: str) -> None:
        self.tracker.set_stage(stage)
        self._progress_changed()

    def set_total(self, nbytes: int) -> None:
        self.tracker.set_total(nbytes)
        self._progress_changed()

    def add_total(self, nbytes: int) -> None:
        self.tracker.add_total(nbytes)
        self._progress_changed()

    def plan(self, stages: dict[str, int]) -> None:
        self.tracker.plan(stages)
        self._progress_changed()

    def advance(self, nbytes: int) -> None:
        self.tracker.advance(nbytes)
        self._progress_changed()

    def set_done(self, nbytes: int) -> None:
        self.tracker.update(nbytes)
        self._progress_changed()

    @property
    def checkpoints(self) -> StoreCheckpoints:
        return self.output.checkpoints

    def staging(self, dest: OpenDir) -> Staging:
        return self.output.staging(dest)

    def record_domain(self, uri: str, uuid: str, console_log: Path | None) -> None:
        self.output.record_domain(uri, uuid, console_log)

    def record_volume(self, uri: str, pool: str, name: str) -> None:
        self.output.record_volume(uri, pool, name)

    def forget_volume(self, uri: str, pool: str, name: str) -> None:
        self.output.forget_volume(uri, pool, name)

    # -- engine side -----------------------------------------------------------------
    def _progress_changed(self) -> None:
        record = self.record
        record.stage = self.tracker.stage
        record.bytes_done = self.tracker.bytes_done
        record.bytes_total = self.tracker.total_shown
        now = time.monotonic()
        if now - self._last_save >= PROGRESS_SAVE_INTERVAL:
            self._last_save = now
            # not watched: progress is shown, not kept; a store that does not answer
            # (a hung server) must not fail the job for it
            store = self.engine.store
            if _on_event_loop():
                store.soon(store.save_progress, record)
            else:
                self._loop.call_soon_threadsafe(store.soon, store.save_progress, record)
        self.engine.notify(JobEvent("progress", record))



class JobEngine:
    def __init__(self, store: Store, config: Config, providers: ProviderRegistry) -> None:
        self.store = store
        self.config = config
        self.providers = providers
        self.instance: str = config.daemon.instance
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()  # a job may be pending: idle workers look
        self._running: dict[str, RunningJob] = {}
        self._workers: list[asyncio.Task] = []
        self._cleanups: set[asyncio.Task] = set()  # of interrupted jobs at the source
        self._export_slots = asyncio.Semaphore(config.export.concurrent_exports)
        self._unrecorded: dict[str, JobRecord] = {}  # finished, but the store refused it
        self._follow_ups: set[asyncio.Task] = set()  # async listeners' work (notify)
        self._accepting = False

    # -- listeners -------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, event: JobEvent) -> None:
        for listener in self._listeners:
            try:
                follow_up = listener(event)
            except Exception:  # a broken listener must not break a job
                log.exception("job listener failed for %s", event.type)
                continue
            if follow_up is not None:
                task = asyncio.ensure_future(follow_up)
                self._follow_ups.add(task)
                task.add_done_callback(self._followed_up)

    def _followed_up(self, task: asyncio.Task) -> None:
        self._follow_ups.discard(task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:  # a bug gets its traceback, a broken store a line
            log.error("job listener failed: %s", failure,
                      exc_info=None if isinstance(failure, self.store.errors) else failure)

    # -- lifecycle -------------------------------------------------------------------
    async def recover(self) -> list[JobRecord]:
        """Mark the work this instance was interrupted in failed (jobs recorded before
        instances were, too); remove what it made but downloads worth resuming
        (job_output.py), and what its jobs that another instance recovered left here.
        Returns the jobs it ended."""
        ended = []
        for job in await self.store.running_on((self.instance, "")):
            left, kept = await remove_leftovers(self.store, job.id, keep_resumable=True,
                                                when="after the restart")
            job.status = "failed"
            job.finished_at = time.time()
            job.error = ("interrupted: hypervisord stopped while the job was running; "
                         + _what_was_left(left, kept))
            if not await self.store.end_if(job, "running", reason="recovered after restart"):
                continue  # another instance recovered it meanwhile (fleet.py)
            await self.store.append_log(job.id, time.time(), "error", job.error)
            # the name is owned by now: a client that already read the job as running
            # (the bridge's mirror, a console) must hear that it is not
            self.notify(JobEvent("status", job))
            ended.append(job)
        for job_id in await self.store.recovered_elsewhere(self.instance):
            await remove_leftovers(self.store, job_id, keep_resumable=False,
                                   when="after the restart (the job was recovered elsewhere)")
        return ended

    def _remove_snapshots_of(self, jobs: list[JobRecord]) -> None:
        """In the background: the snapshots interrupted warm exports left at the source."""
        for job in jobs:
            if job.definition.get("warm"):
                task = asyncio.create_task(self._remove_warm_snapshots(job))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)

    async def _remove_warm_snapshots(self, job: JobRecord) -> None:
        def note(message: str, level: str = "info") -> None:
            self.append_log(job, message, level)

        try:
            provider = await self.providers.get(job.definition["provider"])
            checkpoints = StoreCheckpoints(self.store, job.id, 0, self.store.soon)
            await checkpoints.load()  # every download's checkpoints, by file name
            keep = warm.saved_change_ids(checkpoints, sorted(checkpoints.known))
            await warm.remove_snapshots_of(provider, job.definition["vm_identifier"], job.id,
                                           keep, note)
        except Exception as exc:  # the source may be unreachable now
            note(f"could not remove the snapshots of the interrupted run: "
                 f"{getattr(exc, 'message', exc)}; retrying the job removes them", "warning")

    def wake(self) -> None:
        """A job may be pending: idle workers claim it."""
        self._wake.set()

    async def start(self) -> None:
        await self.store.renew_lease(self.instance, self.config.database.lease_seconds,
                                     starting=True)
        self._remove_snapshots_of(await self.recover())
        await self.prune()
        self._accepting = True
        self._workers = [asyncio.create_task(self._worker(), name=f"job-worker-{i}")
                         for i in range(self.config.daemon.workers)]
        if self.config.export.resume_on_start:
            for job in await self.store.jobs_keeping_downloads():
                retried = await self.retry(job.id, job.started_by_uid, job.requested_by)
                self.append_log(job, f"resumed at start as job {retried.id} "
                                "(export.resume_on_start)")

    async def shutdown(self) -> None:
        """Stop taking work, interrupt running jobs, and wait for the workers."""
        self._accepting = False
        for running in list(self._running.values()):
            running.cancel_reason = "shutdown"
            if running.task:
                running.task.cancel()
        await asyncio.gather(*(r.ended.wait() for r in self._running.values()))
        for task in [*self._workers, *self._cleanups]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._cleanups, return_exceptions=True)
        await asyncio.gather(*self._follow_ups, return_exceptions=True)

    # -- queries ---------------------------------------------------------------------
    async def get(self, job_id: str) -> JobRecord:
        return self.known(job_id) or await self.store.get_job(job_id)

    def known(self, job_id: str) -> JobRecord | None:
        """The job's record if this engine holds it (running here, or ended while the
        store refused it), else None: read the store."""
        running = self._running.get(job_id)
        return running.record if running else self._unrecorded.get(job_id)

    @property
    def running_ids(self) -> set[str]:
        """The jobs running on this instance."""
        return set(self._running)

    def snapshot(self, job: JobRecord) -> ProgressSnapshot:
        """Live progress of a running job; what was recorded for any other."""
        running = self._running.get(job.id)
        if running:
            return running.tracker.snapshot()
        fraction = 1.0 if job.status == "completed" else done_fraction(job.bytes_done,
                                                                        job.bytes_total)
        return ProgressSnapshot(job.bytes_done, job.bytes_total, 0.0, 0, job.stage, fraction)

    async def list(self, status: str | None = None, limit: int = 1000, offset: int = 0,
                   provider: str | None = None) -> list[JobRecord]:
        jobs = await self.store.list_jobs(status, limit, offset, provider)
        return [self._running[j.id].record if j.id in self._running else j for j in jobs]

    # -- commands --------------------------------------------------------------------
    def validate(self, kind_name: str, definition: object) -> tuple[JobKind, dict]:
        kind = get_kind(kind_name)
        if kind is None:
            raise InvalidArgument("kind", f"unknown job kind {kind_name!r}; known: "
                                  + ", ".join(kind_names()))
        return kind, kind.validate(definition, self)

    async def submit(self, kind_name: str, definition: object, uid: int = -1,
                     retry_of: str | None = None, requested_by: str = "",
                     job_id: str | None = None) -> JobRecord:
        """A new pending job (`job_id`: one new_job_id() gave, named earlier)."""
        if not self._accepting:
            raise Failed("hypervisord is shutting down; no new jobs are accepted")
        kind, normalised = self.validate(kind_name, definition)
        summary = kind.describe(normalised)
        job = JobRecord(id=job_id or new_job_id(), kind=kind.name, status="pending",
                        definition=normalised, vm=summary["vm"], provider=summary["provider"],
                        started_by_uid=uid, created_at=time.time(), retry_of=retry_of,
                        requested_by=requested_by)
        await self.store.insert_job(job)
        self.notify(JobEvent("created", job))
        self.wake()
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: running here, at once; pending, before any instance claims it;
        running on another instance, by a request it honours at its next look (fleet.py)."""
        job = await self.get(job_id)
        if job.finished:
            raise InvalidArgument("job", f"job {job_id} has already {job.status}")
        if self.cancel_running(job_id, self.instance):
            return job
        if job.status == "pending" and await self._finish(job, "cancelled",
                                                          error="cancelled before it started"):
            return job
        if not await self.store.request_cancel(job_id, self.instance):
            job = await self.store.get_job(job_id)  # it ended meanwhile
            raise InvalidArgument("job", f"job {job_id} has already {job.status}")
        return await self.store.get_job(job_id)

    async def cutover(self, job_id: str) -> JobRecord:
        """Start the cutover of a warm export running here (jobs/warm.py)."""
        job = await self.get(job_id)
        if not job.definition.get("warm"):
            raise InvalidArgument("job", f"job {job_id} is not a warm migration")
        if job.finished:
            raise InvalidArgument("job", f"job {job_id} has already {job.status}")
        running = self._running.get(job_id)
        if running is None:
            raise InvalidArgument("job", f"job {job_id} is {job.status} on "
                                         f"{job.instance or 'no instance'} yet: a cutover needs "
                                         f"it in pre-copy here")
        if running.cutover.is_set():
            raise InvalidArgument("job", f"job {job_id} is already cut over")
        running.cutover.set()
        running.log("cutover requested")
        return job

    def cancel_running(self, job_id: str, asked_on: str, reason: str = "user") -> bool:
        """Cancel the job if it runs here: a user asked on instance `asked_on`, or (reason
        "lost") another instance recovered it while this one did not answer, or ("lease")
        this one's lease ran out unrenewed and another will (fleet.py)."""
        running = self._running.get(job_id)
        if running is None or running.task is None:
            return False
        running.cancel_reason, running.cancel_asked_on = reason, asked_on
        running.task.cancel()
        return True

    async def retry(self, job_id: str, uid: int, requested_by: str = "") -> JobRecord:
        job = await self.get(job_id)
        if job.status not in ("failed", "cancelled"):
            raise InvalidArgument("job", f"only failed or cancelled jobs can be retried; "
                                  f"{job_id} is {job.status}")
        retried = await self.submit(job.kind, job.definition, uid, retry_of=job.id,
                                    requested_by=requested_by)
        # before the new job can run (submit only queued it): what the old one kept
        # for a resume is the new one's now
        await self.store.hand_over(job.id, retried.id)
        return retried

    async def end_abandoned(self, job_ids: set[str], why: str) -> None:
        """End as failed, saying `why`, those of the jobs this instance stopped without
        recording it (its lease ran out: fleet.py) that no other instance recovered."""
        for job_id in job_ids:
            job = await self.store.get_job(job_id)
            job.status, job.finished_at = "failed", time.time()
            job.error = f"interrupted: {why}; its partial output was removed (retry the job)"
            if await self.store.end_if(job, "running", reason="lease ran out"):
                await self.append_log(job, job.error, "error")
                self.notify(JobEvent("status", job))

    def append_log(self, job: JobRecord, message: str, level: str = "info") -> asyncio.Task:
        """Write a log line of the job in its turn (Store.soon: a job's code logs without
        awaiting), and announce it once written; await the task to know it is."""
        level = level if level in LOG_LEVELS else "info"
        if len(message) > MAX_LOG_MESSAGE:  # a tool's whole output; GetLog pages stay small
            message = (f"{message[:MAX_LOG_MESSAGE]}… ({len(message) - MAX_LOG_MESSAGE} "
                       "more characters)")
        now = time.time()
        written = self.store.soon(self.store.append_log, job.id, now, level, message)

        def announce(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                self.notify(JobEvent("log", job, LogLine(task.result(), now, level, message)))
        written.add_done_callback(announce)
        return written

    # -- running ---------------------------------------------------------------------
    async def _finish(self, job: JobRecord, status: str, error: str = "",
                      result: dict | None = None, reason: str = "") -> bool:
        """End the job as `status`, unless another instance changed it first (claimed a
        pending job, recovered a running one): False then, and nothing is recorded."""
        was = job.status
        job.status = status
        job.finished_at = time.time()
        job.error = error
        if result is not None:
            job.result = result
        try:
            if not await self.store.end_if(job, was, reason=reason):
                log.warning("job %s: not recorded as %s; another instance changed it first "
                            "(it is %s there)", job.id, status,
                            (await self.store.get_job(job.id)).status)
                return False
            if error:
                await self.append_log(job, error, "error" if status == "failed" else "info")
        except self.store.errors as exc:  # listeners still hear the truth; recorded later
            log.error("job %s ended %s but the store could not record it: %s", job.id,
                      status, exc)
            self._unrecorded[job.id] = job
        self.notify(JobEvent("status", job))
        await self.prune()
        return True

    async def prune(self) -> None:
        """Remove the finished jobs database.retention_count/_age no longer keep."""
        settings = self.config.database
        cutoff = time.time() - settings.retention_age if settings.retention_age else 0
        try:
            for job_id in await self.store.past_retention_holding_paths(
                    settings.retention_count, cutoff):
                await remove_leftovers(self.store, job_id, keep_resumable=False, when="pruned")
            removed = await self.store.prune_finished(settings.retention_count, cutoff)
        except self.store.errors as exc:
            log.warning("could not prune finished jobs: %s", exc)
            return
        if removed:
            log.info("removed %d finished job(s) past database.retention_count/_age",
                     len(removed))
        for job in removed:
            self.notify(JobEvent("removed", job))

    async def _record_unrecorded(self) -> None:
        """Write the endings a broken store refused earlier (once it takes them again)."""
        for job_id, job in list(self._unrecorded.items()):
            try:
                await self.store.set_status(job)
            except self.store.errors:
                return
            del self._unrecorded[job_id]

    async def _worker(self) -> None:
        """Claim and run pending jobs for good: one job's failure, even the store's (a
        full disk), fails that job and never this worker."""
        while True:
            self._wake.clear()
            try:
                job = await self._claim()
            except self.store.errors as exc:
                log.warning("worker: cannot claim a pending job: %s", exc)
                job = None
            if job is None:
                await self._wake.wait()
                continue
            try:
                await self._take(job)
            except Exception as exc:
                log.exception("worker: job %s could not be run", job.id)
                await self._fail_unrun(job.id, exc)

    async def _claim(self) -> JobRecord | None:
        """The oldest pending job this instance can start now, claimed; None if none.
        While every export slot is taken, jobs that need one stay pending for others."""
        if not self._accepting:
            return None
        await self._record_unrecorded()
        skip = (tuple(name for name in kind_names() if get_kind(name).export_slot)
                if self._export_slots.locked() else ())
        claimed = await self.store.claim_pending(1, self.instance, skip)
        return claimed[0] if claimed else None

    async def _take(self, job: JobRecord) -> None:
        """Run a job claimed here (an export slot is free for it: `_claim`)."""
        kind = get_kind(job.kind)
        refusal = self._refusal(job, kind)
        if refusal:
            await self._finish(job, "failed", error=refusal)
        elif kind.export_slot:
            async with self._export_slots:
                await self._run(job, kind)
        else:
            await self._run(job, kind)

    def _refusal(self, job: JobRecord, kind: JobKind | None) -> str:
        """Why this instance cannot run a claimed job, or "". Its definition is checked
        again against this instance's config: it may have been submitted on another
        instance sharing the store, and paths are confined to THIS one's roots."""
        if kind is None:
            return f"job kind {job.kind!r} is not available"
        try:
            kind.validate(job.definition, self)
        except HyperSDKError as exc:
            return (f"instance {self.instance} cannot run the job: {exc} (instances sharing "
                    "database.url need the same paths and providers)")
        return ""

    async def _fail_unrun(self, job_id: str, exc: Exception) -> None:
        """A job that could not even be started or finished normally: fail it truthfully."""
        running = self._running.pop(job_id, None)
        try:
            job = running.record if running else await self.store.get_job(job_id)
        except (NotFound, *self.store.errors):
            return
        if not job.finished:
            await self._finish(job, "failed", error=_internal_error(exc, self.store.errors))

    async def _run(self, job: JobRecord, kind: JobKind) -> None:
        running = RunningJob(self, job, kind)
        self._running[job.id] = running
        self.notify(JobEvent("status", job))
        try:
            await running.output.load()
            running.task = asyncio.create_task(self._attempts(running, kind), name=job.id)
            result = await running.task
        except asyncio.CancelledError:
            if running.cancel_reason == "user":
                await running.output.discard()
                asked = (f" on instance {running.cancel_asked_on}"
                         if running.cancel_asked_on != self.instance else "")
                await self._finish(job, "cancelled", error=f"cancelled by the user{asked}")
            elif running.cancel_reason == "store":
                await self._store_refused(running)
            elif running.cancel_reason in ("lost", "lease"):  # the recoverer's record now
                log.warning("job %s: %s; stopped here, what it made here is removed", job.id,
                            f"instance {running.cancel_asked_on} recovered it while this one"
                            " did not answer" if running.cancel_reason == "lost" else
                            "this instance's lease ran out unrenewed (the store did not "
                            "answer): another instance recovers it")
                await running.output.discard()
            else:
                kept = await running.output.suspend()
                await self._finish(job, "failed", error="interrupted by service shutdown; "
                                   + _what_was_left([], kept), reason="shutdown")
            if running.task is None or not running.task.cancelled():
                raise  # the worker itself is being cancelled
        except HyperSDKError as exc:
            await running.output.discard()
            await self._finish(job, "failed", error=exc.message)
        except Exception as exc:  # a bug (the journal gets the traceback) or a broken store
            if isinstance(exc, self.store.errors):
                log.error("job %s: the job store failed: %s", job.id, exc)
            else:
                log.exception("job %s failed unexpectedly", job.id)
            await running.output.discard()
            await self._finish(job, "failed", error=_internal_error(exc, self.store.errors))
        else:
            await running.settle()
            if running.store_failure is not None:
                await self._store_refused(running)
            else:
                await running.output.keep()
                await self._finish(job, "completed", result=result)
        finally:
            self._running.pop(job.id, None)
            running.ended.set()

    async def _store_refused(self, running: RunningJob) -> None:
        """The store refused a write the job's code made: it fails (RunningJob.watch)."""
        await running.output.discard()
        await self._finish(running.record, "failed",
                           error=_internal_error(running.store_failure, self.store.errors))

    async def _attempts(self, running: RunningJob, kind: JobKind) -> dict:
        max_retries = self.config.export.max_retries
        for attempt in range(max_retries + 1):
            running.record.attempts = attempt + 1
            try:
                return await kind.run(running)
            except Retryable as exc:
                if attempt >= max_retries:
                    raise Failed(f"{exc.message} (gave up after {attempt + 1} attempts)") from exc
                delay = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE ** attempt)
                running.log(f"attempt {attempt + 1} failed: {exc.message}; retrying in "
                            f"{delay:g}s", "warning")
                await running.output.discard()
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


def _what_was_left(problems: list[str], kept: int) -> str:
    """The end of an interrupted job's error: what became of what it had made."""
    if problems:
        return (f"{len(problems)} of the things it made could not be removed (see its log) "
                "(retry the job)")
    if kept:
        return (f"its finished files were removed; {kept} verified bytes of its downloads "
                "are kept, and retrying the job resumes after them")
    return "its partial output was removed (retry the job)"


def _internal_error(exc: Exception, store_errors: tuple[type[Exception], ...]) -> str:
    """What the user reads about an unexpected exception (the journal has the rest)."""
    if isinstance(exc, store_errors):
        return f"the job store could not be written ({exc}); see the hypervisord journal"
    return f"internal error ({type(exc).__name__}); see the hypervisord journal"
