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
from typing import Callable

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


Listener = Callable[[JobEvent], None]


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
        self.cancel_reason = ""  # user | shutdown | lost (another instance recovered it)
        self.cancel_asked_on = ""  # the instance a user's cancel came from
        self.cutover = asyncio.Event()  # a warm export's Cutover call (jobs/warm.py)
        self.output = JobOutput(engine.store, record.id, engine.config.export.checkpoint_interval,
                                self.log)
        self._last_save = 0.0

    # -- JobContext ------------------------------------------------------------------
    @property
    def attempt(self) -> int:
        return self.record.attempts

    def log(self, message: str, level: str = "info") -> None:
        self.engine.append_log(self.record, message, level)

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
            self.engine.store.save_progress(record)
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
        self._accepting = False

    # -- listeners -------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, event: JobEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break a job
                log.exception("job listener failed for %s", event.type)

    # -- lifecycle -------------------------------------------------------------------
    def recover(self) -> list[JobRecord]:
        """Mark the work this instance was interrupted in failed (jobs recorded before
        instances were, too); remove what it made but downloads worth resuming
        (job_output.py), and what its jobs that another instance recovered left here.
        Returns the jobs it ended."""
        ended = []
        for job in self.store.running_on((self.instance, "")):
            left, kept = remove_leftovers(self.store, job.id, keep_resumable=True,
                                          when="after the restart")
            job.status = "failed"
            job.finished_at = time.time()
            job.error = ("interrupted: hypervisord stopped while the job was running; "
                         + _what_was_left(left, kept))
            if not self.store.end_if(job, "running", reason="recovered after restart"):
                continue  # another instance recovered it meanwhile (fleet.py)
            self.store.append_log(job.id, time.time(), "error", job.error)
            # the name is owned by now: a client that already read the job as running
            # (the bridge's mirror, a console) must hear that it is not
            self.notify(JobEvent("status", job))
            ended.append(job)
        for job_id in self.store.recovered_elsewhere(self.instance):
            remove_leftovers(self.store, job_id, keep_resumable=False,
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
            checkpoints = StoreCheckpoints(self.store, job.id, 0)
            keep = warm.saved_change_ids(checkpoints, sorted(self.store.checkpoint_names(job.id)))
            await warm.remove_snapshots_of(provider, job.definition["vm_identifier"], job.id,
                                           keep, note)
        except Exception as exc:  # the source may be unreachable now
            note(f"could not remove the snapshots of the interrupted run: "
                 f"{getattr(exc, 'message', exc)}; retrying the job removes them", "warning")

    def wake(self) -> None:
        """A job may be pending: idle workers claim it."""
        self._wake.set()

    async def start(self) -> None:
        self.store.renew_lease(self.instance, self.config.database.lease_seconds,
                               starting=True)
        self._remove_snapshots_of(self.recover())
        self.prune()
        self._accepting = True
        self._workers = [asyncio.create_task(self._worker(), name=f"job-worker-{i}")
                         for i in range(self.config.daemon.workers)]
        if self.config.export.resume_on_start:
            for job in self.store.jobs_keeping_downloads():
                retried = self.retry(job.id, job.started_by_uid, job.requested_by)
                self.append_log(job, f"resumed at start as job {retried.id} "
                                     "(export.resume_on_start)")

    async def shutdown(self) -> None:
        """Stop taking work, interrupt running jobs, and wait for the workers."""
        self._accepting = False
        for running in list(self._running.values()):
            running.cancel_reason = "shutdown"
            if running.task:
                running.task.cancel()
        await asyncio.gather(*(r.task for r in self._running.values() if r.task),
                             return_exceptions=True)
        for task in [*self._workers, *self._cleanups]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._cleanups, return_exceptions=True)

    # -- queries ---------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        running = self._running.get(job_id)
        if running:
            return running.record
        return self._unrecorded.get(job_id) or self.store.get_job(job_id)

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

    def list(self, status: str | None = None, limit: int = 1000, offset: int = 0,
             provider: str | None = None) -> list[JobRecord]:
        jobs = self.store.list_jobs(status, limit, offset, provider)
        return [self._running[j.id].record if j.id in self._running else j for j in jobs]

    # -- commands --------------------------------------------------------------------
    def validate(self, kind_name: str, definition: object) -> tuple[JobKind, dict]:
        kind = get_kind(kind_name)
        if kind is None:
            raise InvalidArgument("kind", f"unknown job kind {kind_name!r}; known: "
                                  + ", ".join(kind_names()))
        return kind, kind.validate(definition, self)

    def submit(self, kind_name: str, definition: object, uid: int = -1,
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
        self.store.insert_job(job)
        self.notify(JobEvent("created", job))
        self.wake()
        return job

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: running here, at once; pending, before any instance claims it;
        running on another instance, by a request it honours at its next look (fleet.py)."""
        job = self.get(job_id)
        if job.finished:
            raise InvalidArgument("job", f"job {job_id} has already {job.status}")
        if self.cancel_running(job_id, self.instance):
            return job
        if job.status == "pending" and self._finish(job, "cancelled",
                                                    error="cancelled before it started"):
            return job
        if not self.store.request_cancel(job_id, self.instance):
            job = self.store.get_job(job_id)  # it ended meanwhile
            raise InvalidArgument("job", f"job {job_id} has already {job.status}")
        return self.store.get_job(job_id)

    def cutover(self, job_id: str) -> JobRecord:
        """Start the cutover of a warm export running here (jobs/warm.py)."""
        job = self.get(job_id)
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
        "lost") another instance recovered it while this one did not answer (fleet.py)."""
        running = self._running.get(job_id)
        if running is None or running.task is None:
            return False
        running.cancel_reason, running.cancel_asked_on = reason, asked_on
        running.task.cancel()
        return True

    def retry(self, job_id: str, uid: int, requested_by: str = "") -> JobRecord:
        job = self.get(job_id)
        if job.status not in ("failed", "cancelled"):
            raise InvalidArgument("job", f"only failed or cancelled jobs can be retried; "
                                  f"{job_id} is {job.status}")
        retried = self.submit(job.kind, job.definition, uid, retry_of=job.id,
                              requested_by=requested_by)
        # before the new job can run (submit only queued it): what the old one kept
        # for a resume is the new one's now
        self.store.hand_over(job.id, retried.id)
        return retried

    def append_log(self, job: JobRecord, message: str, level: str = "info") -> None:
        level = level if level in LOG_LEVELS else "info"
        if len(message) > MAX_LOG_MESSAGE:  # a tool's whole output; GetLog pages stay small
            message = (f"{message[:MAX_LOG_MESSAGE]}… ({len(message) - MAX_LOG_MESSAGE} "
                       "more characters)")
        now = time.time()
        line_id = self.store.append_log(job.id, now, level, message)
        self.notify(JobEvent("log", job, LogLine(line_id, now, level, message)))

    # -- running ---------------------------------------------------------------------
    def _finish(self, job: JobRecord, status: str, error: str = "", result: dict | None = None,
                reason: str = "") -> bool:
        """End the job as `status`, unless another instance changed it first (claimed a
        pending job, recovered a running one): False then, and nothing is recorded."""
        was = job.status
        job.status = status
        job.finished_at = time.time()
        job.error = error
        if result is not None:
            job.result = result
        try:
            if not self.store.end_if(job, was, reason=reason):
                log.warning("job %s: not recorded as %s; another instance changed it first "
                            "(it is %s there)", job.id, status, self.store.get_job(job.id).status)
                return False
            if error:
                self.append_log(job, error, "error" if status == "failed" else "info")
        except self.store.errors as exc:  # listeners still hear the truth; recorded later
            log.error("job %s ended %s but the store could not record it: %s", job.id,
                      status, exc)
            self._unrecorded[job.id] = job
        self.notify(JobEvent("status", job))
        self.prune()
        return True

    def prune(self) -> None:
        """Remove the finished jobs database.retention_count/_age no longer keep."""
        settings = self.config.database
        cutoff = time.time() - settings.retention_age if settings.retention_age else 0
        try:
            for job_id in self.store.past_retention_holding_paths(settings.retention_count,
                                                                  cutoff):
                remove_leftovers(self.store, job_id, keep_resumable=False, when="pruned")
            removed = self.store.prune_finished(settings.retention_count, cutoff)
        except self.store.errors as exc:
            log.warning("could not prune finished jobs: %s", exc)
            return
        if removed:
            log.info("removed %d finished job(s) past database.retention_count/_age",
                     len(removed))
        for job in removed:
            self.notify(JobEvent("removed", job))

    def _record_unrecorded(self) -> None:
        """Write the endings a broken store refused earlier (once it takes them again)."""
        for job_id, job in list(self._unrecorded.items()):
            try:
                self.store.set_status(job)
            except self.store.errors:
                return
            del self._unrecorded[job_id]

    async def _worker(self) -> None:
        """Claim and run pending jobs for good: one job's failure, even the store's (a
        full disk), fails that job and never this worker."""
        while True:
            self._wake.clear()
            try:
                job = self._claim()
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
                self._fail_unrun(job.id, exc)

    def _claim(self) -> JobRecord | None:
        """The oldest pending job this instance can start now, claimed; None if none.
        While every export slot is taken, jobs that need one stay pending for others."""
        if not self._accepting:
            return None
        self._record_unrecorded()
        skip = (tuple(name for name in kind_names() if get_kind(name).export_slot)
                if self._export_slots.locked() else ())
        claimed = self.store.claim_pending(1, self.instance, skip)
        return claimed[0] if claimed else None

    async def _take(self, job: JobRecord) -> None:
        """Run a job claimed here (an export slot is free for it: `_claim`)."""
        kind = get_kind(job.kind)
        refusal = self._refusal(job, kind)
        if refusal:
            self._finish(job, "failed", error=refusal)
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

    def _fail_unrun(self, job_id: str, exc: Exception) -> None:
        """A job that could not even be started or finished normally: fail it truthfully."""
        running = self._running.pop(job_id, None)
        try:
            job = running.record if running else self.store.get_job(job_id)
        except (NotFound, *self.store.errors):
            return
        if not job.finished:
            self._finish(job, "failed", error=_internal_error(exc, self.store.errors))

    async def _run(self, job: JobRecord, kind: JobKind) -> None:
        running = RunningJob(self, job, kind)
        self._running[job.id] = running
        self.notify(JobEvent("status", job))
        running.task = asyncio.create_task(self._attempts(running, kind), name=job.id)
        try:
            result = await running.task
        except asyncio.CancelledError:
            if running.cancel_reason == "user":
                running.output.discard()
                asked = (f" on instance {running.cancel_asked_on}"
                         if running.cancel_asked_on != self.instance else "")
                self._finish(job, "cancelled", error=f"cancelled by the user{asked}")
            elif running.cancel_reason == "lost":  # its record is the recoverer's now
                running.output.discard()
                log.warning("job %s: instance %s recovered it while this one did not answer;"
                            " stopped here and what it made here removed", job.id,
                            running.cancel_asked_on)
            else:
                kept = running.output.suspend()
                self._finish(job, "failed", error="interrupted by service shutdown; "
                             + _what_was_left([], kept), reason="shutdown")
            if not running.task.cancelled():
                raise  # the worker itself is being cancelled
        except HyperSDKError as exc:
            running.output.discard()
            self._finish(job, "failed", error=exc.message)
        except Exception as exc:  # a bug or a broken store: the journal gets the traceback
            log.exception("job %s failed unexpectedly", job.id)
            running.output.discard()
            self._finish(job, "failed", error=_internal_error(exc, self.store.errors))
        else:
            running.output.keep()
            self._finish(job, "completed", result=result)
        finally:
            self._running.pop(job.id, None)

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
                running.output.discard()
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


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
