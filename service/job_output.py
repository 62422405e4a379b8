"""What one job run makes (files, libvirt domains, storage volumes), and what an
interrupted run keeps for its retry.

A run's files are written in staging directories (staging.py), each recorded in the
store as it is made (StoreJournal); a libvirt domain is recorded by the UUID it is
given before it is defined (`record_domain`), a volume on a target by its pool and name
before it is created (`record_volume`). When the run ends:
- completed: what landed, the domains and volumes stay, the staging directories go
  (`keep`);
- failed or cancelled: everything it made goes (`discard`), domains stopped and
  undefined, then volumes deleted;
- interrupted (hypervisord stopped, killed or crashed) while downloads had recorded
  checkpoints (disks/resume.py): what landed goes, but the staging directories stay,
  recorded under the job with their checkpoints (`suspend`, or `remove_leftovers` after
  a crash); its domains and volumes go.
  Retrying the job hands them over to the new job (Store.hand_over), whose export adopts
  the staging directory in the same destination and resumes the downloads after their
  last verified checkpoint. Data nobody retries goes when the job's record is pruned.
"""
from __future__ import annotations

import asyncio
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .confine import OpenDir
from .errors import Failed
from .kvm.libvirt_import import remove_domain_by_uuid
from .kvm.targets import names_a_host, remove_volume
from .model import Checkpoint, SavedDownload
from .redact import redact_url
from .staging import JobStagings, OwnedPath, Staging, remove_owned
from .store import Store

Log = Callable[..., None]
# a store call, with its arguments, made by the job's code without awaiting it
# (RunningJob.write: in its turn, from the event loop or a worker thread)
Write = Callable[..., None]


@dataclass(frozen=True)
class StoreJournal:
    """staging.Journal for a job: what it makes is recorded in the store as it is made,
    so a restart after a crash can remove it (JobEngine.recover). The job's code does
    not await: the record is written in its turn (Store.soon), before any store call
    made after it, a failure logged (an unrecorded path is still removed by the run
    itself: JobStagings knows it; RunningJob.write fails the job)."""

    store: Store
    job_id: str
    write: Write

    def record(self, owned: OwnedPath) -> None:
        self.write(self.store.record_owned, self.job_id, owned)

    def forget(self, owned: OwnedPath) -> None:
        self.write(self.store.forget_owned, self.job_id, owned)


@dataclass
class StoreCheckpoints:
    """model.DownloadCheckpoints for a job's downloads, kept in the store and mirrored
    here (the job's code reads them without awaiting; the job is their only writer while
    it runs): what an earlier run saved is read when the run starts (`load`), what this
    one saves is written in its turn (RunningJob.write fails the job should the store
    refuse it)."""

    store: Store
    job_id: str
    interval: int  # export.checkpoint_interval; 0: no checkpoints
    write: Write
    known: dict[str, SavedDownload] = field(default_factory=dict)

    async def load(self) -> None:
        self.known = await self.store.saved_downloads(self.job_id)

    def saved(self, target_name: str) -> SavedDownload | None:
        return self.known.get(target_name)

    def save(self, target_name: str, temp_name: str, validator: str,
             point: Checkpoint) -> None:
        saved = self.known.setdefault(target_name, SavedDownload(temp_name, validator, []))
        saved.checkpoints.append(point)
        self.write(self.store.save_checkpoint, self.job_id, target_name, temp_name,
                   validator, point)

    def clear(self, target_name: str | None = None) -> None:
        """Forget the checkpoints of `target_name` (None: of every download)."""
        if target_name is None:
            self.known.clear()
        else:
            self.known.pop(target_name, None)
        self.write(self.store.clear_checkpoints, self.job_id, target_name)


class JobOutput:
    """The staging directories and checkpoints of one job run; see the module docstring."""

    def __init__(self, store: Store, job_id: str, checkpoint_interval: int, log: Log,
                 write: Write) -> None:
        self.store = store
        self.job_id = job_id
        self.checkpoints = StoreCheckpoints(store, job_id, checkpoint_interval, write)
        self._log = log
        self._write = write
        self._journal = StoreJournal(store, job_id, write)
        self._stagings = JobStagings()
        self._inherited: list[OwnedPath] = []  # handed over by Store.hand_over
        self._inherited_names: set[str] = set()  # what the inherited checkpoints are about

    async def load(self) -> None:
        """Read what an interrupted run handed over (before the job's code runs)."""
        self._inherited = await self.store.owned_paths(self.job_id)
        self._inherited_names = await self.store.checkpoint_names(self.job_id)
        await self.checkpoints.load()

    def staging(self, dest: OpenDir) -> Staging:
        """The staging directory an interrupted run kept in `dest`, else a new one."""
        kept = next((owned for owned in self._inherited if owned.kind == "staging"
                     and _parent_of(owned) == (str(dest.root), dest.relative)), None)
        if kept is not None:
            created = [owned for owned in self._inherited
                       if owned.kind == "dir" and _on_the_way(owned, kept)]
            self._inherited = [owned for owned in self._inherited
                               if owned is not kept and owned not in created]
            try:
                staging = self._stagings.adopt(dest, kept, created, self._journal,
                                               self._inherited_names)
                self._log(f"resuming from what the interrupted job left in {kept.shown}")
                return staging
            except (OSError, Failed) as exc:
                self._log(f"cannot resume from {kept.shown} ({exc}); starting afresh",
                          "warning")
                self._forget([kept, *created])
        return self._stagings.create(dest, self.job_id, self._journal)

    def record_domain(self, uri: str, uuid: str, console_log: Path | None) -> None:
        self._write(self.store.record_domain, self.job_id, uri, uuid, str(console_log or ""))

    def record_volume(self, uri: str, pool: str, name: str) -> None:
        self._write(self.store.record_volume, self.job_id, uri, pool, name)

    def forget_volume(self, uri: str, pool: str, name: str) -> None:
        self._write(self.store.forget_volume, self.job_id, uri, pool, name)

    async def keep(self) -> None:
        """The run completed: what landed stays, its staging directories go."""
        await self.store.forget_domains(self.job_id)
        await self.store.forget_volumes(self.job_id)
        self._stagings.keep()
        await self._end()

    async def discard(self) -> None:
        """The run failed or was cancelled: everything it made goes (its files even when
        the store does not answer: which domains and volumes it made, only the store
        says)."""
        try:
            await self._remove_domains()
        except self.store.errors as exc:
            self._log(f"could not read which domains and volumes the job made: {exc}",
                      "warning")
        for problem in self._stagings.discard():
            self._log(problem, "warning")
        await self._end()

    async def suspend(self) -> int:
        """The run was interrupted: keep the downloads worth resuming (see the module
        docstring) and return their verified bytes; without any, discard everything."""
        names = await self.store.checkpoint_names(self.job_id)

        def holding(staging: Staging) -> bool:
            return _holds(staging.path, names)

        resumable = await self.store.resumable_bytes(self.job_id)
        if not resumable or not any(holding(staging) for staging in self._stagings):
            await self.discard()
            return 0
        await self._remove_domains()
        for problem in self._stagings.suspend(holding):
            self._log(problem, "warning")
        self._remove(self._inherited)
        return resumable

    async def _remove_domains(self) -> None:
        for problem in await remove_domains(self.store, self.job_id):
            self._log(problem, "warning")

    async def _end(self) -> None:
        self.checkpoints.clear()
        self._remove(self._inherited)

    def _remove(self, inherited: list[OwnedPath]) -> None:
        """Remove what was handed over and not adopted (another destination, say)."""
        for owned in reversed(inherited):
            problem = remove_owned(owned)
            if problem:
                self._log(problem, "warning")
        self._forget(inherited)

    def _forget(self, paths: list[OwnedPath]) -> None:
        for owned in paths:
            self._journal.forget(owned)
        self._inherited = [owned for owned in self._inherited if owned not in paths]


async def remove_leftovers(store: Store, job_id: str, keep_resumable: bool,
                           when: str) -> tuple[list[str], int]:
    """Remove what a job that is not running made, newest first, logging each step
    ("{when}: removed ..."); with `keep_resumable`, the staging directories that hold
    checkpointed downloads stay, with the directories made for them. Returns what could
    not be removed and the bytes kept for a resume."""
    resumable = await store.resumable_bytes(job_id) if keep_resumable else 0
    problems = await remove_domains(store, job_id)
    for problem in problems:
        await store.append_log(job_id, time.time(), "warning", problem)
    owned_paths = await store.owned_paths(job_id)
    kept = (_kept_for_resume(owned_paths, await store.checkpoint_names(job_id))
            if resumable else [])
    resumable = resumable if kept else 0  # checkpoints of files no longer there vouch for nothing
    for owned in reversed(owned_paths):
        if owned in kept:
            continue
        problem = remove_owned(owned)
        if problem:
            problems.append(problem)
            await store.append_log(job_id, time.time(), "warning", problem)
        else:
            await store.append_log(job_id, time.time(), "info",
                                   f"{when}: removed {owned.kind} {owned.shown}")
        await store.forget_owned(job_id, owned)
    if not resumable:
        await store.clear_checkpoints(job_id)
    return problems, resumable


async def remove_domains(store: Store, job_id: str) -> list[str]:
    """Stop and undefine the domains the job defined, and remove their console logs, then
    delete the volumes it created (made only when a job that defined a domain or created a
    volume did not complete); what was left, one line each."""
    domains = await store.owned_domains(job_id)
    volumes = await store.owned_volumes(job_id)
    _, problems = await asyncio.to_thread(_remove_made, domains, volumes)
    await store.forget_domains(job_id)
    await store.forget_volumes(job_id)
    return problems


async def remove_from_shared_hosts(store: Store,
                                   job_id: str) -> tuple[list[str], list[str]]:
    """Remove the domains and volumes a job made at libvirt URIs naming a host (the
    instance recovering a dead instance's job: those hosts are reached from here too,
    and a retry needs the names free), and forget them. What the job made at its own
    instance's libvirt stays for that instance's restart, and so does a domain's console
    log (a file on that instance's host). (what was removed, what was left), a line
    each."""
    domains = [(uri, uuid, "") for uri, uuid, _ in await store.owned_domains(job_id)
               if names_a_host(uri)]
    volumes = [volume for volume in await store.owned_volumes(job_id)
               if names_a_host(volume[0])]
    removed, problems = await asyncio.to_thread(_remove_made, domains, volumes)
    for uri, uuid, _ in domains:
        await store.forget_domain(job_id, uri, uuid)
    for uri, pool, name in volumes:
        await store.forget_volume(job_id, uri, pool, name)
    return removed, problems


def _remove_made(domains: list[tuple[str, str, str]],
                 volumes: list[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """Domains (uri, uuid, console log) first, they use the volumes (uri, pool, name);
    blocking: libvirt calls, over ssh a connection each. (what was removed, what was
    left), one line each."""
    removed: list[str] = []
    problems: list[str] = []
    for uri, uuid, console_log in domains:
        if problem := remove_domain_by_uuid(uri, uuid, console_log):
            problems.append(problem)
        else:
            removed.append(f"removed domain {uuid} at {redact_url(uri)}")
    for uri, pool, name in volumes:
        if problem := remove_volume(uri, pool, name):
            problems.append(problem)
        else:
            removed.append(f"removed volume {name!r} of pool {pool!r} at {redact_url(uri)}")
    return removed, problems


def _kept_for_resume(owned_paths: list[OwnedPath], names: set[str]) -> list[OwnedPath]:
    """The staging directories that hold a checkpointed download (`names`), and the
    directories made on the way to them: what a retry adopts."""
    stagings = [owned for owned in owned_paths
                if owned.kind == "staging" and _holds(Path(owned.shown), names)]
    return stagings + [owned for owned in owned_paths if owned.kind == "dir" and any(
        _on_the_way(owned, staging) for staging in stagings)]


def _on_the_way(directory: OwnedPath, staging: OwnedPath) -> bool:
    """Whether `directory` was made on the way to `staging` (is one of its parents)."""
    return (directory.root == staging.root
            and staging.relative.startswith(directory.relative + "/"))


def _holds(staging: Path, names: set[str]) -> bool:
    """Whether the staging directory holds one of the checkpointed downloads. (After a
    crash its path may run through directories others can change: a planted link can at
    most make a staging directory stay until the job is retried or pruned; removing is
    done safely.)"""
    return any(os.path.lexists(staging / name) for name in names)


def _parent_of(owned: OwnedPath) -> tuple[str, str]:
    return owned.root, posixpath.dirname(owned.relative)
