"""Paths that callers name, confined to the roots the configuration allows.

A caller (D-Bus, REST, the console) names files for hypervisord, which runs as root,
to read and write. Each such path must lie inside one of the configured roots:
`paths.sources` for what is read (a /convert source, an /import-to-kvm disk,
ParseVmdk) and `paths.outputs` for what is written (a /convert output_path). Export
paths stay under `export.base_path`. The roots themselves are the administrator's
and may be symlinks; below a root, the path is resolved by the kernel with
openat2(RESOLVE_BENEATH), so `..`, absolute symlinks and symlinks that lead out of
the root are refused, and the file opened is the file checked (no race between a
check and an open).

A path that breaks a rule is refused with InvalidArgument naming the field; the
refusal for a path outside the roots never depends on whether it exists, so a
caller cannot probe the rest of the file system.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import InvalidArgument, NotFound
from .files import fd_path, name_exists, open_beneath

if TYPE_CHECKING:
    from .config import Config

LIBVIRT_IMAGES = "/var/lib/libvirt/images"
DIR_MODE = 0o755


@dataclass(frozen=True)
class Roots:
    """Where callers may name files: sources are read, outputs are written."""

    sources: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_config(cls, config: "Config") -> "Roots":
        return cls(tuple(config.paths.sources), tuple(config.paths.outputs))


def default_roots(config_document: dict) -> tuple[list[str], list[str]]:
    """paths.sources / paths.outputs when the config names none: the service's own
    directories (exports, converted images, OVA imports) and libvirt's default pool."""
    export = config_document["export"]["base_path"]
    output = config_document["hyper2kvm"]["output_dir"]
    imports = list(config_document["ova"]["import_dirs"])
    outputs = _unique([export, output, LIBVIRT_IMAGES])
    return _unique([*outputs, *imports]), outputs


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(paths))


@dataclass
class OpenDir:
    """A directory held open: `fd` is what the service uses, `root`/`relative` how it was
    reached (for messages and for recovery after a restart), `created` the directories
    opening it made (innermost last), which a failed job removes again."""

    fd: int
    root: Path
    relative: str
    created: list[str] = field(default_factory=list)

    @property
    def shown(self) -> Path:
        """The path users know this directory by."""
        return self.root / self.relative if self.relative else self.root

    @property
    def path(self) -> Path:
        """A path through the fd (see files.fd_path)."""
        return fd_path(self.fd)

    def holds(self, name: str) -> bool:
        """Whether anything (a file, a link, ...) is named `name` in this directory."""
        return name_exists(self.fd, name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "OpenDir":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


@dataclass
class OpenFile:
    """A regular file opened read-only inside a root, and the directory it is in.

    A file that names others next to it (a VMDK descriptor and its extents, an OVF and
    its disks) opens them with `sibling`, never by a path."""

    fd: int
    dir_fd: int
    name: str
    shown: Path

    @property
    def dir_path(self) -> Path:
        """Its name in its directory, the directory reached through its fd. Safe to open by
        only when nobody but root can change that directory (staging.link_source)."""
        return fd_path(self.dir_fd) / self.name

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def has_sibling(self, name: str) -> bool:
        """Whether anything (a file, a link, ...) is named `name` next to this file."""
        return name_exists(self.dir_fd, name)

    def sibling(self, name: str, field_name: str) -> "OpenFile":
        """The regular file `name` next to this one: a plain name, not a link."""
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidArgument(field_name, f"{name!r} must be a plain file name next to "
                                              f"{self.shown.name}")
        return _open_in_dir(os.dup(self.dir_fd), name, self.shown.parent / name, field_name)

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1

    def __enter__(self) -> "OpenFile":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def _open_in_dir(dir_fd: int, name: str, shown: Path, field_name: str) -> OpenFile:
    """Open `name` in dir_fd (which the OpenFile then owns): a regular file, no link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        os.close(dir_fd)
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(field_name, f"{shown} is a symlink: refused") from None
        raise _refusal(exc, field_name, shown, shown.parent) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        os.close(dir_fd)
        raise InvalidArgument(field_name, f"{shown} is not a regular file")
    os.set_blocking(fd, True)
    return OpenFile(fd, dir_fd, name, shown)


def split_under(value: Any, roots: Iterable[str], field_name: str, what: str) -> tuple[Path, str]:
    """(root, relative path) for a caller's absolute path that lies inside one of `roots`.

    Purely textual: `..` is refused outright, and a root is matched as configured or
    as its real path (a root that is itself a symlink)."""
    roots = list(roots)
    rule = f"an absolute path inside the {what} roots ({', '.join(roots) or 'none configured'})"
    if not isinstance(value, str) or not value or "\0" in value:
        raise InvalidArgument(field_name, rule)
    if not value.startswith("/"):
        raise InvalidArgument(field_name, f"{value!r} is not an absolute path; expected {rule}")
    if ".." in value.split("/"):
        raise InvalidArgument(field_name, f"must not contain '..' components; expected {rule}")
    normal = posixpath.normpath(value)
    for root in roots:
        for form in _root_forms(root):
            if normal == form or normal.startswith(form.rstrip("/") + "/"):
                return Path(root), posixpath.relpath(normal, form) if normal != form else ""
    raise InvalidArgument(field_name, f"{value!r} is outside the {what} roots; expected {rule}")


def _root_forms(root: str) -> list[str]:
    normal = posixpath.normpath(root)
    real = os.path.realpath(normal)
    return [normal] if real == normal else [normal, real]


def _open_root(root: Path, field_name: str, create: bool = False) -> int:
    """A configured root; an output root that does not exist yet is made (it is the
    administrator's configuration, not a caller's name)."""
    try:
        if create and not os.path.lexists(root):
            os.makedirs(root, mode=0o755, exist_ok=True)
        return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"{field_name}: the configured root {root} is not usable "
                       f"({exc.strerror})") from None


def _refusal(exc: OSError, field_name: str, shown: Path, root: Path) -> Exception:
    if exc.errno == errno.EXDEV:
        return InvalidArgument(field_name, f"{shown} reaches outside {root} through a "
                                           "symlink: refused")
    if exc.errno == errno.ELOOP:
        return InvalidArgument(field_name, f"{shown}: too many levels of symlinks")
    if exc.errno == errno.ENOTDIR:
        return InvalidArgument(field_name, f"{shown}: a component is not a directory")
    if exc.errno == errno.ENOENT:
        return InvalidArgument(field_name, f"{shown}: no such file or directory")
    return InvalidArgument(field_name, f"{shown}: {exc.strerror}")


def open_source(value: Any, roots: Iterable[str], field_name: str) -> OpenFile:
    """Open a caller-named regular file inside the source roots, read-only. Its directory
    is reached beneath the root (symlinks that stay inside are fine); the file itself
    must not be a symlink."""
    root, relative = split_under(value, roots, field_name, "source")
    shown = root / relative
    if not relative:
        raise InvalidArgument(field_name, f"{shown} is a root directory, not a file")
    parent, name = posixpath.split(relative)
    root_fd = _open_root(root, field_name)
    try:
        dir_fd = open_beneath(root_fd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _refusal(exc, field_name, shown, root) from None
    finally:
        os.close(root_fd)
    return _open_in_dir(dir_fd, name, shown, field_name)


def check_source(value: Any, roots: Iterable[str], field_name: str) -> str:
    """The normalised path of a caller-named source file (checked as open_source does)."""
    with open_source(value, roots, field_name) as opened:
        return str(opened.shown)


def open_dir(root: Path, relative: str, field_name: str, *, create: bool) -> OpenDir:
    """Open root/relative (a directory), creating missing components when `create`.

    Each component is reached with openat2 beneath the root; a created one is made by
    mkdirat, which never follows a link planted at its name, and is recorded in
    `created` so that a failed job can remove it again."""
    root_fd = _open_root(root, field_name, create)
    created: list[str] = []
    try:
        parts = [part for part in relative.split("/") if part]
        for index in range(len(parts) + 1):
            prefix = "/".join(parts[:index])
            try:
                fd = _open_dir_fd(root_fd, prefix)
            except FileNotFoundError:
                if not create:
                    raise
                parent = _open_dir_fd(root_fd, "/".join(parts[:index - 1]))
                try:
                    os.mkdir(parts[index - 1], DIR_MODE, dir_fd=parent)
                    created.append(prefix)
                except FileExistsError:
                    pass  # made meanwhile by someone else: opened (and checked) below
                finally:
                    os.close(parent)
                fd = _open_dir_fd(root_fd, prefix)
            if index < len(parts):
                os.close(fd)
        return OpenDir(fd, root, "/".join(parts), created)
    except OSError as exc:
        raise _refusal(exc, field_name, root / relative, root) from None
    finally:
        os.close(root_fd)


def _open_dir_fd(root_fd: int, relative: str) -> int:
    return open_beneath(root_fd, relative or ".", os.O_RDONLY | os.O_DIRECTORY)


def open_output_dir(value: Any, roots: Iterable[str], field_name: str, *,
                    create: bool = True) -> OpenDir:
    """Open (and, with `create`, make) a caller-named directory inside the output roots."""
    root, relative = split_under(value, roots, field_name, "output")
    return open_dir(root, relative, field_name, create=create)


def real_path(fd: int) -> Path:
    """Where an open file or directory really is (what the kernel resolved)."""
    return Path(os.readlink(fd_path(fd)))


def changeable_by_others(directory: Path) -> Path | None:
    """The first directory on the way from / to `directory` (a real path) that a user
    other than root could rename things in, or None when only root can: then a path
    through it means tomorrow what it means today, even for programs (libvirt, virtlogd,
    qemu) that open files by path and follow links. A sticky directory counts as safe
    when the entry below it is root's (others cannot rename that entry)."""
    parts = Path(directory).parts
    current = Path("/")
    for depth in range(len(parts)):
        st = os.lstat(current)
        if st.st_uid != 0:
            return current
        if st.st_mode & 0o022:
            below = current / parts[depth + 1] if depth + 1 < len(parts) else None
            if not (st.st_mode & stat.S_ISVTX and below is not None
                    and os.lstat(below).st_uid == 0):
                return current
        if depth + 1 < len(parts):
            current = current / parts[depth + 1]
    return None
