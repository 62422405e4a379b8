"""Define a domain in libvirt (libvirt-python, blocking calls in a thread).

When the spec leaves the domain type open, the domain type and CPU are the ones
`cpu_choice.py` finds this host starts (or `libvirt.cpu_mode` pins), starting from
kvm if the hypervisor at the URI offers KVM for x86_64 guests, else qemu (TCG).

An existing domain is never overwritten: the name and the UUID are looked up
first, and libvirt itself refuses a define whose name exists under another UUID,
so a define can only create. When autostart or start fails after the define,
the new domain is undefined again so nothing half-imported is left behind.
"""
from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from lxml import etree

from ..confine import changeable_by_others
from ..errors import AlreadyExists, Failed, InvalidArgument, NotFound, Unavailable
from .cpu_choice import AUTO, CpuChoice, choose_cpu
from .domain_xml import DomainSpec, build_domain_xml, default_cpu, detect_domain_type, domain_notes


@dataclass
class ImportedDomain:
    name: str
    uuid: str
    uri: str
    autostart: bool
    started: bool
    notes: list[str]
    serial_log: str
    cpu: CpuChoice

    @property
    def domain_type(self) -> str:
        return self.cpu.domain_type

    def to_dict(self) -> dict:
        return {"domain": self.name, "uuid": self.uuid, "uri": self.uri,
                "domain_type": self.domain_type, "cpu": self.cpu.to_dict(),
                "autostart": self.autostart, "started": self.started, "notes": self.notes,
                "serial_log": self.serial_log}


def _libvirt():
    import libvirt  # imported here: the daemon starts even where libvirt-python is absent

    # libvirt prints every error on stderr by default; ours carry them in exceptions.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


async def import_domain(uri: str, spec: DomainSpec, *, autostart: bool = False,
                        start: bool = False, cpu_mode: str = AUTO) -> ImportedDomain:
    """Build the XML for `spec` and define it at `uri`; optionally autostart and start it.
    `cpu_mode` is `libvirt.cpu_mode` (used when the spec leaves the domain type open)."""
    for disk in spec.disks:
        if not disk.pool:  # a volume was checked by its pool (kvm/targets.py)
            await asyncio.to_thread(check_disk_for_libvirt, Path(disk.path))
    build_domain_xml(spec)  # refuse a bad spec before connecting
    name, uuid, cpu = await asyncio.to_thread(_define, uri, spec, autostart, start, cpu_mode)
    return ImportedDomain(name, uuid, uri, autostart, start, domain_notes(spec),
                          str(spec.serial_log or ""), cpu)


def check_disk_for_libvirt(path: Path) -> None:
    """A disk libvirt may be given: a regular file (not a link) in a directory only root
    can change. libvirt, virtlogd and QEMU open disks and the serial log beside them by
    path, following links, and libvirt hands the disk to the QEMU user: a path through a
    directory others can write could be pointed at any file on the host once checked."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"disk {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument("disk_path", f"{path} is not a regular file")
    unsafe = changeable_by_others(path.parent)
    if unsafe is not None:
        raise InvalidArgument("disk_path", f"{path}: {unsafe} can be changed by users other "
                              "than root, and libvirt opens disks by path; import disks from "
                              "a directory only root can write (such as the output of "
                              "/convert)")


async def preflight(uri: str, name: str, uuid: str, networks: list[str]) -> None:
    """Raise now what import_domain would raise later for this name, UUID and networks,
    so a long conversion does not start for a VM that cannot be imported."""
    await asyncio.to_thread(_preflight, uri, name, uuid, networks)


def _preflight(uri: str, name: str, uuid: str, networks: list[str]) -> None:
    libvirt = _libvirt()
    conn = _open(libvirt, uri)
    try:
        _check_target(libvirt, conn, uri, name, uuid, networks)
    finally:
        conn.close()


def connect(uri: str):
    """An open libvirt connection to `uri` (blocking); Unavailable when there is none."""
    return _open(_libvirt(), uri)


async def remove_domain(uri: str, name: str) -> None:
    """Stop and undefine domain `name` at `uri` (with its NVRAM) if it is there."""
    await asyncio.to_thread(_remove, uri, name)


def _remove(uri: str, name: str) -> None:
    libvirt = _libvirt()
    conn = _open(libvirt, uri)
    try:
        _stop_and_undefine(libvirt, uri, lambda: conn.lookupByName(name))
    finally:
        conn.close()


def _stop_and_undefine(libvirt, uri: str, lookup) -> None:
    """Stop and undefine the domain `lookup()` finds, if there is one."""
    if _absent(libvirt, uri, lookup, libvirt.VIR_ERR_NO_DOMAIN):
        return
    domain = lookup()
    if domain.isActive():
        domain.destroy()
    _undefine(libvirt, domain)


def remove_domain_by_uuid(uri: str, uuid: str, console_log: str = "") -> str:
    """Stop and undefine the domain with `uuid` at `uri` if it is there, then remove the
    file its serial console was logged to (blocking): what a job defined, found by the
    UUID it was given, never another domain of that name. Returns "" when it is gone,
    else why something was left."""
    problem = _remove_by_uuid(uri, uuid)
    return problem or _remove_console_log(console_log)


def _remove_console_log(path: str) -> str:
    """virtlogd writes the log as a new file each time (so it cannot be told by its
    inode); it lies beside the domain's disk, in a directory only root can change
    (check_disk_for_libvirt), and only a regular file by that name is removed."""
    if not path:
        return ""
    try:
        parent = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    name = os.path.basename(path)
    try:
        if stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"left the console log {path}: {exc.strerror}"
    finally:
        os.close(parent)
    return ""


def _remove_by_uuid(uri: str, uuid: str) -> str:
    try:
        libvirt = _libvirt()
        conn = _open(libvirt, uri)
    except Unavailable as exc:
        return f"left domain {uuid}: {exc.message}"
    try:
        _stop_and_undefine(libvirt, uri, lambda: conn.lookupByUUIDString(uuid))
        return ""
    except Failed as exc:
        return f"left domain {uuid}: {exc.message}"
    except libvirt.libvirtError as exc:
        return f"left domain {uuid} at {uri}: {exc.get_error_message()}"
    finally:
        conn.close()


def _open(libvirt, uri: str):
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise Unavailable(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from exc


def _check_target(libvirt, conn, uri: str, name: str, uuid: str, networks: list[str]) -> None:
    _check_free(libvirt, conn, uri, name, uuid)
    for network in sorted(set(networks)):
        _check_network(libvirt, conn, uri, network)


def _define(uri: str, spec: DomainSpec, autostart: bool, start: bool,
            cpu_mode: str) -> tuple[str, str, CpuChoice]:
    libvirt = _libvirt()
    name = spec.name
    conn = _open(libvirt, uri)
    try:
        _check_target(libvirt, conn, uri, name, spec.uuid,
                      [nic.network for nic in spec.nics if nic.kind == "network"])
        cpu = _cpu_for(libvirt, conn, uri, spec, cpu_mode)
        spec = replace(spec, domain_type=cpu.domain_type, cpu=cpu.cpu)
        xml = build_domain_xml(spec)
        try:
            domain = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as exc:
            raise Failed(f"libvirt at {uri} refused domain {name!r}: "
                         f"{exc.get_error_message()}") from exc
        try:
            if autostart:
                domain.setAutostart(1)
            if start:
                domain.create()
        except libvirt.libvirtError as exc:
            _undefine(libvirt, domain)
            what = "start" if start else "set autostart for"
            raise Failed(f"libvirt at {uri} could not {what} domain {name!r} "
                         f"(the definition was removed again): {exc.get_error_message()}") from exc
        return domain.name(), domain.UUIDString(), cpu
    finally:
        conn.close()


def _cpu_for(libvirt, conn, uri: str, spec: DomainSpec, cpu_mode: str) -> CpuChoice:
    """The spec's own domain type and CPU when it sets a domain type, else the choice
    for this URI (probed once, or pinned by `cpu_mode`)."""
    if spec.domain_type:
        return CpuChoice(spec.domain_type, spec.cpu or default_cpu(spec.domain_type),
                         "set by the caller")
    return choose_cpu(libvirt, conn, uri, cpu_mode, _domain_type_at(conn))


def _domain_type_at(conn) -> str:
    """kvm when the hypervisor behind `conn` offers it for x86_64 guests, else qemu; the
    local guess (detect_domain_type) for drivers that offer neither (test:///)."""
    caps = etree.fromstring(conn.getCapabilities().encode())
    offered = set(caps.xpath("guest[arch/@name='x86_64']/arch/domain/@type"))
    for domain_type in ("kvm", "qemu"):
        if domain_type in offered:
            return domain_type
    return detect_domain_type()


def _absent(libvirt, uri: str, lookup, missing_code: int) -> bool:
    """True when `lookup()` fails with `missing_code`; other libvirt errors are failures."""
    try:
        lookup()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == missing_code:
            return True
        raise Failed(f"libvirt at {uri}: {exc.get_error_message()}") from exc
    return False


def _check_free(libvirt, conn, uri: str, name: str, uuid: str) -> None:
    if not _absent(libvirt, uri, lambda: conn.lookupByName(name), libvirt.VIR_ERR_NO_DOMAIN):
        raise AlreadyExists(f"a domain named {name!r} already exists at {uri}; "
                            "it is left untouched (choose another vm_name)")
    if uuid and not _absent(libvirt, uri, lambda: conn.lookupByUUIDString(uuid),
                            libvirt.VIR_ERR_NO_DOMAIN):
        other = conn.lookupByUUIDString(uuid).name()
        raise AlreadyExists(f"domain {other!r} at {uri} already has UUID {uuid}; "
                            "it is left untouched")


def _check_network(libvirt, conn, uri: str, network: str) -> None:
    if not _absent(libvirt, uri, lambda: conn.networkLookupByName(network),
                   libvirt.VIR_ERR_NO_NETWORK):
        return
    try:
        known = ", ".join(sorted(conn.listNetworks() + conn.listDefinedNetworks())) or "none"
    except libvirt.libvirtError:
        known = "unknown"
    raise NotFound(f"libvirt network {network!r} does not exist at {uri} "
                   f"(defined networks: {known})")


def _undefine(libvirt, domain) -> None:
    try:
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError:
        domain.undefine()
