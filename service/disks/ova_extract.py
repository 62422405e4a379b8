"""Open an OVA (a tar) safely: stream-extract it and check its `.mf` manifest.

Nothing may land outside the target: members with `..`, absolute names, links,
device files, fifos or duplicate names are refused. Members are hashed while they
are written (one pass over the archive) and checked against the manifest's SHA1 /
SHA256 / SHA512 lines. Extraction goes to a hidden temporary directory next to the
target that is renamed into place only when everything checked out; on any
failure it is removed, so a bad OVA leaves nothing behind.

OVF requires the descriptor to be the first member; OVAs we produce obey that,
foreign ones that do not are accepted with a warning.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ..confine import OpenFile
from ..errors import AlreadyExists, Cancelled, Failed, InvalidArgument
from ..files import temp_path_for

COPY_CHUNK = 1 << 20
HASHES = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")

LogFn = Callable[[str], None]


MAX_MANIFEST_BYTES = 1 << 20


def parse_manifest(path: Path) -> dict[str, tuple[str, str]]:
    """`{file name: (algorithm, hex digest)}` from an OVF `.mf` file."""
    with open(path, "rb") as fh:
        return parse_manifest_text(fh.read(MAX_MANIFEST_BYTES + 1), str(path))


def parse_manifest_text(data: bytes, where: str) -> dict[str, tuple[str, str]]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidArgument(where, f"a manifest larger than {MAX_MANIFEST_BYTES} bytes")
    entries: dict[str, tuple[str, str]] = {}
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _MF_LINE.match(line.strip())
        if not match:
            raise InvalidArgument(where, f"line {lineno} is not 'SHA256(file)= digest'")
        alg, name, digest = match.groups()
        entries[_safe_name(name, where).as_posix()] = (alg, digest.lower())
    return entries


def _safe_name(name: str, where: str) -> PurePosixPath:
    """A relative member name that stays inside the target directory."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or name.startswith("/"):
        raise InvalidArgument(where, f"member {name!r} has an absolute name: refused")
    if ".." in rel.parts:
        raise InvalidArgument(where, f"member {name!r} contains '..' and would escape the "
                                     f"target directory: refused")
    if "\\" in name or "\0" in name or rel.as_posix() in ("", "."):
        raise InvalidArgument(where, f"member {name!r} is not a plain relative file name")
    return rel


def _member_kind_error(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return f"member {member.name!r} is a {'symlink' if member.issym() else 'hard link'} " \
               f"(to {member.linkname!r}): links are refused"
    if member.ischr() or member.isblk():
        return f"member {member.name!r} is a device file: refused"
    if member.isfifo():
        return f"member {member.name!r} is a fifo: refused"
    if member.issparse():
        return f"member {member.name!r} is a GNU sparse file: refused"
    if not (member.isreg() or member.isdir()):
        return f"member {member.name!r} has an unsupported type {member.type!r}: refused"
    return None


@dataclass
class _Watch:
    """Cancellation and progress for an extraction running in a thread."""

    stop: threading.Event | None
    on_bytes: Callable[[int], None] | None

    def chunk(self, nbytes: int) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Cancelled("OVA extraction cancelled")
        if self.on_bytes is not None:
            self.on_bytes(nbytes)


def _copy_hashed(src, dest: Path, algorithms: list[str], watch: _Watch) -> dict[str, str]:
    hashers = {alg: HASHES[alg]() for alg in algorithms}
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            watch.chunk(len(chunk))
            out.write(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return {alg: h.hexdigest() for alg, h in hashers.items()}


def hash_file(path: Path, algorithm: str) -> str:
    with open(path, "rb") as fh:
        return hash_stream(fh, algorithm)


def hash_stream(fh, algorithm: str) -> str:
    hasher = HASHES[algorithm]()
    while chunk := fh.read(COPY_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()


def _check_digests(root: Path, manifest: dict[str, tuple[str, str]],
                   computed: dict[str, dict[str, str]], where: str) -> None:
    """Compare manifest lines with digests computed while writing (or hash now)."""
    for name, (alg, expected) in manifest.items():
        target = root / name
        if not target.is_file():
            raise Failed(f"{where}: {name} is listed in the manifest but not present")
        actual = computed.get(name, {}).get(alg) or hash_file(target, alg)
        if actual != expected:
            raise Failed(f"{where}: {name}: {alg} digest mismatch: the manifest says "
                         f"{expected}, the file has {actual}")


def verify_manifest(ovf: OpenFile, field_name: str = "source_path") -> dict[str, str]:
    """Check every file the OVF's manifest (`<ovf stem>.mf` next to it) lists; return
    {name: algorithm}, or {} when there is no manifest. Each file is opened next to
    the OVF without following links, and hashed from the opened file."""
    manifest_name = PurePosixPath(ovf.name).stem + ".mf"
    if not ovf.has_sibling(manifest_name):
        return {}
    with ovf.sibling(manifest_name, field_name) as mf, os.fdopen(os.dup(mf.fd), "rb") as fh:
        manifest = parse_manifest_text(fh.read(MAX_MANIFEST_BYTES + 1), str(mf.shown))
    for name, (alg, expected) in manifest.items():
        if "/" in name or not ovf.has_sibling(name):
            raise Failed(f"{ovf.shown}: {name} is listed in the manifest but not present")
        with ovf.sibling(name, field_name) as listed, os.fdopen(os.dup(listed.fd), "rb") as fh:
            actual = hash_stream(fh, alg)
        if actual != expected:
            raise Failed(f"{ovf.shown}: {name}: {alg} digest mismatch: the manifest says "
                         f"{expected}, the file has {actual}")
    return {name: alg for name, (alg, _d) in manifest.items()}


def _extract_members(path: Path, tmp: Path, watch: _Watch) -> tuple[list[str], dict]:
    """Write every member under tmp; return (regular file names in order, digests)."""
    seen: set[str] = set()
    files: list[str] = []
    computed: dict[str, dict[str, str]] = {}
    manifest: dict[str, tuple[str, str]] | None = None
    where = str(path)
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if member.isdir() and member.name.strip("/") in (".", ""):
                    continue  # the "./" entry of `tar -C dir .`
                rel = _safe_name(member.name, where)
                name = rel.as_posix()
                if name in seen:
                    raise InvalidArgument(where, f"member {name!r} appears twice: refused")
                seen.add(name)
                problem = _member_kind_error(member)
                if problem:
                    raise InvalidArgument(where, problem)
                dest = tmp / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                algs = [manifest[name][0]] if manifest and name in manifest else ["SHA1", "SHA256"]
                computed[name] = _copy_hashed(tar.extractfile(member), dest, algs, watch)
                files.append(name)
                if name.endswith(".mf"):
                    manifest = parse_manifest(dest)
    except (tarfile.ReadError, EOFError) as exc:
        raise Failed(f"{path}: not a readable tar archive or truncated: {exc}") from None
    if not files:
        raise InvalidArgument(where, "the archive holds no files")
    return files, computed


def extract_ova(path: Path, target_dir: Path, log: LogFn | None = None,
                stop: threading.Event | None = None,
                on_bytes: Callable[[int], None] | None = None) -> Path:
    """Safely extract the OVA at `path` into `target_dir` (created); return the .ovf path.

    Blocking. Setting `stop` (from another thread) aborts with Cancelled and removes
    everything written; `on_bytes(n)` is called for every chunk of n bytes written.
    """
    path, target_dir = Path(path), Path(target_dir)
    say = log or (lambda message: None)
    if not path.is_file():
        raise InvalidArgument(str(path), "no such file")
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise AlreadyExists(f"{target_dir}: already exists and is not an empty directory")
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target_dir)
    tmp.mkdir(mode=0o700)
    try:
        files, computed = _extract_members(path, tmp, _Watch(stop, on_bytes))
        ovfs = [name for name in files if name.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise InvalidArgument(str(path), f"an OVA holds exactly one .ovf descriptor, this "
                                             f"one has {len(ovfs)}")
        if files[0] != ovfs[0]:
            say(f"warning: {path.name}: the first member is {files[0]!r}, not the .ovf "
                f"descriptor (OVF requires it first); accepted")
        manifests = [name for name in files if name.lower().endswith(".mf")]
        if len(manifests) > 1:
            raise InvalidArgument(str(path), "more than one .mf manifest")
        if manifests:
            _check_digests(tmp, parse_manifest(tmp / manifests[0]), computed, str(path))
            say(f"{path.name}: manifest {manifests[0]} checked ({len(files) - 1} files)")
        else:
            say(f"warning: {path.name}: no .mf manifest, file digests not checked")
        if target_dir.exists():
            target_dir.rmdir()
        os.rename(tmp, target_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target_dir / ovfs[0]
