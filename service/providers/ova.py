"""Local OVA/OVF files as a source: how users bring VMs exported by other tools.

`vm_identifier` is the path of an .ova or .ovf file (or a name relative to one of
`ova.import_dirs`). The path is resolved (symlinks included) and must then lie
inside one of the import directories; anything else is refused before a byte is
read. No config section is needed (`provider: "ova"` always exists).

- list_vms: the .ova/.ovf files in the import directories (one level of
  subdirectories, as an unpacked OVF usually sits in its own folder).
- get_vm: the parsed OVF descriptor (disks/ovf.py: no DTDs, no entities). For an
  OVA only the descriptor member is read from the tar.
- export_disks: an OVA is safe-extracted with its .mf checked (disks/ova_extract.py)
  into a hidden directory inside the target, its disks are moved into the target
  and the rest is removed; for an OVF the directory's .mf is checked and the
  referenced disks are copied (streamed, sha256). The normal pipeline takes over.
"""
from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import secrets
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..confine import OpenFile, open_source
from ..errors import Failed, InvalidArgument, NotFound
from ..disks.convert import detect_format
from ..disks.ova_extract import extract_ova, parse_manifest, verify_manifest
from ..disks.ovf import MAX_OVF_BYTES, OvfInfo, parse_ovf
from ..disks.threads import from_any_thread, run_stoppable
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider
from .common import OutputFiles, check_filter, closest, provider_options

SDK_MODULES: tuple[str, ...] = ()
CONFIG_SCHEMA: dict = {}   # type/enabled only; the directories are `ova.import_dirs`
SUFFIXES = (".ova", ".ovf")
FILTER_KEYS = ("name", "directory")
COPY_CHUNK = 4 << 20


class OvaProvider(Provider):
    kind = "ova"

    # ------------------------------------------------------------------ paths

    def _import_dirs(self) -> list[Path]:
        return [Path(d).resolve() for d in self.config.ova.import_dirs]

    def resolve(self, identifier: str) -> Path:
        """The real path of an OVA/OVF inside an import directory, or InvalidArgument/NotFound."""
        dirs = self._import_dirs()
        rule = ("a path to an .ova or .ovf file inside one of the import directories "
                f"(ova.import_dirs: {', '.join(map(str, dirs)) or 'none'}), symlinks resolved")
        if not identifier or "\0" in identifier:
            raise InvalidArgument("vm_identifier", rule)
        given = Path(identifier)
        candidates = [given] if given.is_absolute() else [d / given for d in dirs]
        for candidate in candidates:
            real = candidate.resolve()
            if not any(real.is_relative_to(d) for d in dirs):
                raise InvalidArgument("vm_identifier", f"{identifier!r} resolves to {real}, "
                                      f"outside the import directories; expected {rule}")
            if real.exists():
                if not real.is_file() or real.suffix.lower() not in SUFFIXES:
                    raise InvalidArgument("vm_identifier", f"{identifier!r} is not an .ova or "
                                          f".ovf file; expected {rule}")
                return real
        names = [p.name for p in self._files()]
        raise NotFound(f"no OVA/OVF {identifier!r} in the import directories"
                       f"{closest(given.name, names)}")

    def _files(self) -> list[Path]:
        found: list[Path] = []
        for directory in self._import_dirs():
            for pattern in ("*", "*/*"):
                found.extend(p for p in directory.glob(pattern)
                             if p.suffix.lower() in SUFFIXES and p.is_file()
                             and p.resolve().is_relative_to(directory))
        return sorted(set(found))

    # -------------------------------------------------------------- discovery

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        result = []
        for path in await asyncio.to_thread(self._files):
            if "directory" in vm_filter and not path.is_relative_to(
                    Path(str(vm_filter["directory"])).resolve()):
                continue
            try:
                vm = await asyncio.to_thread(self._describe, path)
            except (InvalidArgument, Failed) as exc:
                vm = VMInfo(identifier=str(path), name=path.stem, provider=self.name,
                            path=str(path), extra={"error": str(exc)})
            if "name" in vm_filter and not fnmatch.fnmatchcase(vm.name, str(vm_filter["name"])):
                continue
            result.append(vm)
        return result

    async def get_vm(self, identifier: str) -> VMInfo:
        path = await asyncio.to_thread(self.resolve, identifier)
        return await asyncio.to_thread(self._describe, path)

    def _describe(self, path: Path) -> VMInfo:
        if path.suffix.lower() == ".ovf":
            return self._vm_info(path, parse_ovf(path))
        with tempfile.TemporaryDirectory(prefix="hypersdk-ovf-") as scratch:
            descriptor = Path(scratch) / "descriptor.ovf"
            _read_descriptor(path, descriptor)
            return self._vm_info(path, parse_ovf(descriptor))

    def _vm_info(self, path: Path, info: OvfInfo) -> VMInfo:
        disks = [DiskInfo(key=disk.disk_id, label=disk.file_href or disk.disk_id,
                          capacity_bytes=disk.capacity_bytes, location=disk.file_href or "",
                          controller=disk.controller or "", boot_order=disk.boot_order,
                          file_bytes=disk.populated_bytes)
                 for disk in info.disks]
        nics = [NicInfo(key=f"nic-{index}", mac=nic.mac or "", network=nic.network or "",
                        adapter=(nic.model or "").lower())
                for index, nic in enumerate(info.nics)]
        return VMInfo(identifier=str(path), name=info.name, provider=self.name,
                      power_state="poweredOff", path=str(path), guest_os=info.os_type or "",
                      cpus=info.cpus, memory_mb=info.memory_mb,
                      firmware="uefi" if info.firmware == "efi" else "bios",
                      disks=disks, nics=nics,
                      extra={"source_format": path.suffix.lower().lstrip("."),
                             "hw_version": info.hw_version or ""})

    # ----------------------------------------------------------------- export

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        provider_options(options.extra, ())  # the ova provider takes none
        path = await asyncio.to_thread(self.resolve, identifier)
        target_dir.mkdir(parents=True, exist_ok=True)
        outputs = OutputFiles(target_dir)
        try:
            if path.suffix.lower() == ".ova":
                return await self._from_ova(path, target_dir, sink, outputs)
            return await self._from_ovf(path, target_dir, sink, outputs)
        except BaseException:
            outputs.discard()
            raise

    async def _from_ova(self, path: Path, target_dir: Path, sink: ExportSink,
                        outputs: OutputFiles) -> tuple[VMInfo, list[ExportedDisk]]:
        size = path.stat().st_size
        sink.add_total(size)
        unpacked = target_dir / f".unpack-{secrets.token_hex(4)}"
        try:
            sink.log(f"extracting {path.name} ({size} bytes), checking its manifest")
            # on cancel the worker is stopped and waited for: it removes its partial directory
            log = from_any_thread(sink.log)  # extract_ova logs from its thread
            descriptor = await run_stoppable(lambda stop: extract_ova(path, unpacked, log, stop))
            sink.advance(size)
            info = await asyncio.to_thread(parse_ovf, descriptor)
            vm = self._vm_info(path, info)
            digests = _sha256_lines(unpacked)
            disks = []
            for index, disk in enumerate(vm.disks):
                source = _member(unpacked, disk.location, path)
                target = target_dir / _disk_name(vm.name, index, source)
                os.rename(source, target)
                outputs.add(target)
                sha256 = digests.get(disk.location) or await asyncio.to_thread(_sha256, target)
                disks.append(await self._exported(target, disk, sha256))
            return vm, disks
        finally:
            await asyncio.to_thread(shutil.rmtree, unpacked, True)

    async def _from_ovf(self, path: Path, target_dir: Path, sink: ExportSink,
                        outputs: OutputFiles) -> tuple[VMInfo, list[ExportedDisk]]:
        with await asyncio.to_thread(open_source, str(path), self.config.ova.import_dirs,
                                     "vm_identifier") as ovf:
            checked = await asyncio.to_thread(verify_manifest, ovf, "vm_identifier")
            sink.log(f"{path.name}: manifest checked ({len(checked)} files)" if checked else
                     f"warning: {path.name}: no .mf manifest next to it, digests not checked")
            info = await asyncio.to_thread(parse_ovf, ovf.dir_path)
            vm = self._vm_info(path, info)
            sources = [_sibling_disk(ovf, disk.location, path) for disk in vm.disks]
            try:
                sink.add_total(sum(source.size for source in sources))
                disks = []
                for index, (disk, source) in enumerate(zip(vm.disks, sources)):
                    target = target_dir / _disk_name(vm.name, index, Path(source.name))
                    sha256 = await _copy(source, target, sink)
                    outputs.add(target)
                    disks.append(await self._exported(target, disk, sha256))
            finally:
                for source in sources:
                    source.close()
        return vm, disks

    async def _exported(self, target: Path, disk: DiskInfo, sha256: str) -> ExportedDisk:
        fmt = await asyncio.to_thread(detect_format, target)
        return ExportedDisk(path=target, format=fmt, capacity_bytes=disk.capacity_bytes,
                            file_bytes=target.stat().st_size, sha256=sha256,
                            boot_order=disk.boot_order, label=disk.label, key=disk.key)


def _read_descriptor(ova: Path, out: Path) -> None:
    """Copy the OVA's .ovf member (at most MAX_OVF_BYTES) to `out`, reading tar headers only."""
    try:
        with tarfile.open(ova, mode="r:") as tar:
            for member in tar:
                if member.name.lower().endswith(".ovf") and member.isreg():
                    if member.size > MAX_OVF_BYTES:
                        raise InvalidArgument(str(ova), f"the descriptor is larger than "
                                                        f"{MAX_OVF_BYTES} bytes")
                    with tar.extractfile(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return
    except (tarfile.TarError, EOFError) as exc:
        raise Failed(f"{ova}: not a readable tar archive or truncated: {exc}") from None
    raise InvalidArgument(str(ova), "the archive holds no .ovf descriptor")


def _plain_href(href: str, where: Path) -> str:
    rel = PurePosixPath(href)
    if not href or len(rel.parts) != 1 or rel.name in (".", "..") or "\\" in href \
            or "://" in href:
        raise InvalidArgument(str(where), f"disk file reference {href!r} is not a plain "
                                          "file name inside the package")
    return rel.name


def _member(root: Path, href: str, where: Path) -> Path:
    """The file an OVF `href` names in the extracted package `root` (the job's staging)."""
    path = root / _plain_href(href, where)
    if path.is_symlink() or not path.is_file():
        raise Failed(f"{where}: the disk file {href!r} the descriptor references is missing")
    return path


def _sibling_disk(ovf: OpenFile, href: str, where: Path) -> OpenFile:
    """The disk file an OVF `href` names next to the OVF, opened without following links."""
    name = _plain_href(href, where)
    if not ovf.has_sibling(name):
        raise Failed(f"{where}: the disk file {href!r} the descriptor references is missing")
    return ovf.sibling(name, "vm_identifier")


def _sha256_lines(directory: Path) -> dict[str, str]:
    """{name: sha256} from the (already verified) manifest, when it uses SHA256."""
    manifests = sorted(directory.glob("*.mf"))
    if not manifests:
        return {}
    return {name: digest for name, (alg, digest) in parse_manifest(manifests[0]).items()
            if alg == "SHA256"}


def _disk_name(vm_name: str, index: int, source: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in vm_name).strip("._") or "vm"
    return f"{stem}-disk{index + 1}{source.suffix.lower()}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _copy(source: OpenFile, target: Path, sink: ExportSink) -> str:
    """Stream `source` to `target` (temp name, fsync, rename), returning its sha256."""
    temp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(os.dup(source.fd), "rb") as src, open(temp, "wb") as dst:
            while chunk := await asyncio.to_thread(src.read, COPY_CHUNK):
                digest.update(chunk)
                await asyncio.to_thread(dst.write, chunk)
                sink.advance(len(chunk))
            dst.flush()
            await asyncio.to_thread(os.fsync, dst.fileno())
        os.rename(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


PROVIDER_CLASS = OvaProvider
