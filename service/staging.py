"""The one convention for everything a job writes: stage privately, land without clobbering.

A job never creates a file where somebody else could have planted something. It
writes into a staging directory of its own inside the destination directory
(`.hypersdk-staging-<job>-<random>`, made by mkdirat with mode 0700, so only root can
enter it, and used through its fd, so renaming it or planting a link at its name
redirects nothing). A finished file lands in the destination as a hard link
(linkat): nothing that already exists there is ever replaced (AlreadyExists
instead), the data is fsynced first, so a crash leaves either no file or the whole
file, and the job goes on reading its own name in staging, which nobody can swap,
until the job ends and the staging directory goes.

Everything a job makes (its staging directories, the files it landed, the
directories it created) is an `OwnedPath`: root, relative path, device and inode,
recorded in the store as it is made (`Journal`). Removing one (`remove_owned`)
opens its parent beneath the root and removes it only while it is still the very
inode the job made — so a job never removes what it did not create, neither on
failure nor when a restart cleans up after a crash.
"""
from __future__ import annotations

import errno
import os
import posixpath
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .confine import OpenDir, OpenFile, changeable_by_others, real_path
from .errors import AlreadyExists, Failed, InvalidArgument
from .files import fd_path, fsync_dir, open_beneath

STAGING_PREFIX = ".hypersdk-staging-"
KINDS = ("staging", "file", "dir")


@dataclass(frozen=True)
class OwnedPath:
    """Something a job created: kind is staging | file | dir."""

    kind: str
    root: str
    relative: str
    dev: int
    ino: int

    @property
    def shown(self) -> str:
        return posixpath.join(self.root, self.relative)


class Journal(Protocol):
    """Where a job's OwnedPaths are recorded as they are made (the store, for a real job)."""

    def record(self, owned: OwnedPath) -> None: ...
    def forget(self, owned: OwnedPath) -> None: ...


def _owned(kind: str, directory: OpenDir, name: str, st: os.stat_result) -> OwnedPath:
    return OwnedPath(kind, str(directory.root), posixpath.join(directory.relative, name),
                     st.st_dev, st.st_ino)


class Staging:
    """A job's private directory inside `dest`; see the module docstring."""

    def __init__(self, dest: OpenDir, fd: int, owned: OwnedPath, created: list[OwnedPath],
                 journal: Journal) -> None:
        self.dest = dest
        self.fd = fd
        self.owned = owned
        self.created = created  # directories made on the way to dest, outermost first
        self._journal = journal
        self.landed: list[OwnedPath] = []

    @classmethod
    def create(cls, dest: OpenDir, job_id: str, journal: Journal) -> "Staging":
        """Make the staging directory (and record the directories `dest` created)."""
        created = []
        for relative in dest.created:
            st = _stat_under(dest, relative)
            created.append(OwnedPath("dir", str(dest.root), relative, st.st_dev, st.st_ino))
            journal.record(created[-1])
        dest.created = []
        name = f"{STAGING_PREFIX}{job_id}-{secrets.token_hex(4)}"
        os.mkdir(name, 0o700, dir_fd=dest.fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dest.fd)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            os.close(fd)
            raise Failed(f"{dest.shown}/{name}: replaced by someone else while it was made")
        owned = _owned("staging", dest, name, st)
        journal.record(owned)
        return cls(dest, fd, owned, created, journal)

    @classmethod
    def adopt(cls, dest: OpenDir, owned: OwnedPath, created: list[OwnedPath],
              journal: Journal, keep: set[str]) -> "Staging":
        """Take over the staging directory that an interrupted run of the job kept in
        `dest` for a resume (its records handed over to this job): it must still be the
        very directory that run made, root's and private. Everything in it but the files
        named in `keep` (downloads to resume) goes."""
        fd = os.open(posixpath.basename(owned.relative),
                     os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dest.fd)
        st = os.fstat(fd)
        if ((st.st_dev, st.st_ino) != (owned.dev, owned.ino) or st.st_uid != os.geteuid()
                or stat.S_IMODE(st.st_mode) & 0o077):
            os.close(fd)
            raise Failed(f"{owned.shown}: no longer the staging directory the job made")
        for entry in os.listdir(fd):
            if entry not in keep:
                _remove_entry(fd, entry)
        return cls(dest, fd, owned, created, journal)

    @property
    def path(self) -> Path:
        """The staging directory, by a path through its fd (usable by child processes
        given the fd: files.fds_in)."""
        return fd_path(self.fd)

    def land(self, name: str, final_name: str | None = None) -> Path:
        """fsync staging/name and link it as dest/final_name, never replacing anything;
        return the path users know it by (staging/name stays the job's to read). Blocking."""
        final_name = final_name or name
        _check_plain_name(final_name)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            os.link(name, final_name, src_dir_fd=self.fd, dst_dir_fd=self.dest.fd,
                    follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(f"{self.dest.shown / final_name} already exists; it is left "
                                "untouched (remove it or choose another destination)") from None
        owned = _owned("file", self.dest, final_name, st)
        self._journal.record(owned)
        self.landed.append(owned)
        fsync_dir(self.dest.fd)
        return self.dest.shown / final_name

    def write(self, name: str, data: bytes) -> Path:
        """Small content (a descriptor, a manifest) as staging/name; returns its path."""
        _check_plain_name(name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=self.fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return self.path / name

    def link_source(self, source: OpenFile, field_name: str) -> Path:
        """A path by which `source` can be read without a race: its own path when only
        root can change its directory, else a hard link to the opened inode in this
        staging directory (a link needs the same file system; else InvalidArgument)."""
        if changeable_by_others(real_path(source.dir_fd)) is None:
            return source.dir_path
        name = source.name
        try:
            os.link(fd_path(source.fd), name, dst_dir_fd=self.fd, follow_symlinks=True)
        except FileExistsError:
            pass  # the same name twice (an OVF that lists a disk twice): already linked
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            raise InvalidArgument(field_name, f"{source.shown} is in a directory users other "
                                  "than root can change, and on another file system than "
                                  f"{self.dest.shown}: hypervisord reads such files only "
                                  "through a hard link of its own; move it onto that file "
                                  "system or into a directory only root can write") from None
        return self.path / name

    def keep(self) -> None:
        """The job succeeded: remove the staging directory; what landed stays."""
        self._clear()
        remove_owned(self.owned)
        for owned in [self.owned, *self.created, *self.landed]:
            self._journal.forget(owned)
        self.landed = []
        self._close()

    def discard(self) -> list[str]:
        """The job failed: remove what landed and the staging directory. Returns what
        could not be removed (one line each)."""
        self._clear()
        return self._remove([*reversed(self.landed), self.owned, *reversed(self.created)])

    def suspend(self) -> list[str]:
        """The job was interrupted with downloads worth resuming: remove what landed
        (an incomplete set must not look complete), keep the staging directory and the
        records of it and of the directories made for it, for a retry to adopt. Returns
        what could not be removed."""
        return self._remove(list(reversed(self.landed)))

    def _remove(self, paths: list[OwnedPath]) -> list[str]:
        """Remove and forget `paths` (in that order), then close; what was left."""
        problems = []
        for owned in paths:
            problem = remove_owned(owned)
            if problem:
                problems.append(problem)
            self._journal.forget(owned)
        self.landed = []
        self._close()
        return problems

    def _clear(self) -> None:
        """Empty the staging directory through its fd (wherever it has been moved)."""
        if self.fd < 0:
            return
        for entry in os.listdir(self.fd):
            _remove_entry(self.fd, entry)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.dest.close()


class JobStagings:
    """The staging directories of one job run, kept or discarded together (the engine's
    RunningJob and the tests' stand-in both hold one)."""

    def __init__(self) -> None:
        self._stagings: list[Staging] = []

    def create(self, dest: OpenDir, job_id: str, journal: Journal) -> Staging:
        staging = Staging.create(dest, job_id, journal)
        self._stagings.append(staging)
        return staging

    def adopt(self, dest: OpenDir, owned: OwnedPath, created: list[OwnedPath],
              journal: Journal, keep: set[str]) -> Staging:
        staging = Staging.adopt(dest, owned, created, journal, keep)
        self._stagings.append(staging)
        return staging

    def __len__(self) -> int:
        return len(self._stagings)

    def __iter__(self) -> Iterator[Staging]:
        return iter(self._stagings)

    def suspend(self, worth_keeping: Callable[[Staging], bool]) -> list[str]:
        """Suspend the staging directories `worth_keeping`, discard the others."""
        problems = [problem for staging in reversed(self._stagings)
                    for problem in (staging.suspend() if worth_keeping(staging)
                                    else staging.discard())]
        self._stagings.clear()
        return problems

    def keep(self) -> None:
        for staging in self._stagings:
            staging.keep()
        self._stagings.clear()

    def discard(self) -> list[str]:
        """Discard the newest first; what could not be removed, one line each."""
        problems = [problem for staging in reversed(self._stagings)
                    for problem in staging.discard()]
        self._stagings.clear()
        return problems


def _stat_under(dest: OpenDir, relative: str) -> os.stat_result:
    """stat of a directory `dest` created on its way (relative to dest's root)."""
    root_fd = os.open(dest.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_beneath(root_fd, relative, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def _check_plain_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise Failed(f"{name!r} is not a plain file name")


def _remove_entry(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def remove_owned(owned: OwnedPath) -> str:
    """Remove what a job made, if it is still what the job made. Returns "" when it is
    gone, else why it was left (for the job's log). Blocking."""
    parent_rel, name = posixpath.split(owned.relative)
    try:
        root_fd = os.open(owned.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parent = open_beneath(root_fd, parent_rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        finally:
            os.close(root_fd)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"left {owned.shown}: its directory cannot be opened ({exc.strerror})"
    try:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return ""
        if (st.st_dev, st.st_ino) != (owned.dev, owned.ino):
            return f"left {owned.shown}: it is no longer what the job created"
        if owned.kind == "file":
            os.unlink(name, dir_fd=parent)
        elif owned.kind == "staging":
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.rmdir(name, dir_fd=parent)
    except OSError as exc:
        if owned.kind == "dir" and exc.errno == errno.ENOTEMPTY:
            return f"left {owned.shown}: it holds files the job did not make"
        return f"left {owned.shown}: {exc.strerror}"
    finally:
        os.close(parent)
    return ""
