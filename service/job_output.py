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

import logging
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .confine import OpenDir
from .errors import Failed
from .kvm.libvirt_import import remove_domain_by_uuid
from .kvm.targets import remove_volume
from .model import Checkpoint, SavedDownload
from .staging import JobStagings, OwnedPath, Staging, remove_owned
from .store import Store

log = logging.getLogger(__name__)
Log = Callable[..., None]


@dataclass(frozen=True)
class StoreJournal:
    """staging.Journal for a job: what it makes is in the store before the thing itself
    exists, so a restart after a crash can remove it (JobEngine.recover)."""

    store: Store
    job_id: str

    def record(self, owned: OwnedPath) -> None:
        self.store.record_owned(self.job_id, owned)

    def forget(self, owned: OwnedPath) -> None:
        try:
            self.store.forget_owned(self.job_id, owned)
        except self.store.errors as exc:  # the path is gone already; recovery finds nothing
            log.warning("job %s: could not forget %s in the store: %s", self.job_id,
                        owned.relative, exc)


@dataclass(frozen=True)
class StoreCheckpoints:
    """model.DownloadCheckpoints for a job's downloads, kept in the store."""

    store: Store
    job_id: str
    interval: int  # export.checkpoint_interval; 0: no checkpoints

    def saved(self, target_name: str) -> SavedDownload | None:
        return self.store.saved_download(self.job_id, target_name)

    def save(self, target_name: str, temp_name: str, validator: str,
             point: Checkpoint) -> None:
        try:
            self.store.save_checkpoint(self.job_id, target_name, temp_name, validator, point)
        except self.store.errors as exc:  # a resume then starts from an earlier checkpoint
            log.warning("job %s: could not record a checkpoint of %s: %s", self.job_id,
                        target_name, exc)

    def clear(self, target_name: str) -> None:
        self.store.clear_checkpoints(self.job_id, target_name)


class JobOutput:
    """The staging directories and checkpoints of one job run; see the module docstring."""

    def __init__(self, store: Store, job_id: str, checkpoint_interval: int, log: Log) -> None:
        self.store = store
        self.job_id = job_id
        self.checkpoints = StoreCheckpoints(store, job_id, checkpoint_interval)
        self._log = log
        self._journal = StoreJournal(store, job_id)
        self._stagings = JobStagings()
        self._inherited = store.owned_paths(job_id)  # handed over by Store.hand_over

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
                                               self.store.checkpoint_names(self.job_id))
                self._log(f"resuming from what the interrupted job left in {kept.shown}")
                return staging
            except (OSError, Failed) as exc:
                self._log(f"cannot resume from {kept.shown} ({exc}); starting afresh",
                          "warning")
                self._forget([kept, *created])
        return self._stagings.create(dest, self.job_id, self._journal)

    def record_domain(self, uri: str, uuid: str, console_log: Path | None) -> None:
        self.store.record_domain(self.job_id, uri, uuid, str(console_log or ""))

    def record_volume(self, uri: str, pool: str, name: str) -> None:
        self.store.record_volume(self.job_id, uri, pool, name)

    def forget_volume(self, uri: str, pool: str, name: str) -> None:
        self.store.forget_volume(self.job_id, uri, pool, name)

    def keep(self) -> None:
        """The run completed: what landed stays, its staging directories go."""
        self.store.forget_domains(self.job_id)
        self.store.forget_volumes(self.job_id)
        self._stagings.keep()
        self._end()

    def discard(self) -> None:
        """The run failed or was cancelled: everything it made goes."""
        self._remove_domains()
        for problem in self._stagings.discard():
            self._log(problem, "warning")
        self._end()

    def suspend(self) -> int:
        """The run was interrupted: keep the downloads worth resuming (see the module
        docstring) and return their verified bytes; without any, discard everything."""
        names = self.store.checkpoint_names(self.job_id)

        def holding(staging: Staging) -> bool:
            return _holds(staging.path, names)

        resumable = self.store.resumable_bytes(self.job_id)
        if not resumable or not any(holding(staging) for staging in self._stagings):
            self.discard()
            return 0
        self._remove_domains()
        for problem in self._stagings.suspend(holding):
            self._log(problem, "warning")
        self._remove(self._inherited)
        return resumable

    def _remove_domains(self) -> None:
        for problem in remove_domains(self.store, self.job_id):
            self._log(problem, "warning")

    def _end(self) -> None:
        self.store.clear_checkpoints(self.job_id)
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


def remove_leftovers(store: Store, job_id: str, keep_resumable: bool,
                     when: str) -> tuple[list[str], int]:
    """Remove what a job that is not running made, newest first, logging each step
    ("{when}: removed ..."); with `keep_resumable`, the staging directories that hold
    checkpointed downloads stay, with the directories made for them. Returns what could
    not be removed and the bytes kept for a resume."""
    resumable = store.resumable_bytes(job_id) if keep_resumable else 0
    problems = remove_domains(store, job_id)
    for problem in problems:
        store.append_log(job_id, time.time(), "warning", problem)
    owned_paths = store.owned_paths(job_id)
    kept = _kept_for_resume(owned_paths, store.checkpoint_names(job_id)) if resumable else []
    resumable = resumable if kept else 0  # checkpoints of files no longer there vouch for nothing
    for owned in reversed(owned_paths):
        if owned in kept:
            continue
        problem = remove_owned(owned)
        if problem:
            problems.append(problem)
            store.append_log(job_id, time.time(), "warning", problem)
        else:
            store.append_log(job_id, time.time(), "info",
                             f"{when}: removed {owned.kind} {owned.shown}")
        store.forget_owned(job_id, owned)
    if not resumable:
        store.clear_checkpoints(job_id)
    return problems, resumable


def remove_domains(store: Store, job_id: str) -> list[str]:
    """Stop and undefine the domains the job defined, and remove their console logs, then
    delete the volumes it created (blocking: libvirt calls, made only when a job that
    defined a domain or created a volume did not complete); what was left, one line
    each."""
    problems = [problem for uri, uuid, console_log in store.owned_domains(job_id)
                if (problem := remove_domain_by_uuid(uri, uuid, console_log))]
    store.forget_domains(job_id)
    problems += [problem for uri, pool, name in store.owned_volumes(job_id)
                 if (problem := remove_volume(uri, pool, name))]
    store.forget_volumes(job_id)
    return problems


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
