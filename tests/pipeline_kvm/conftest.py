"""Fixtures for the domain / import / hyper2kvm tests: real libvirt, a dbusmock systemd,
a bootable disk, and the recording stand-in for the job engine's context."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import libvirt
import pytest

from hypersdk.service.config import parse_config
from hypersdk.service.jobs.export import ExportKind
from hypersdk.service.model import ExportedDisk
from hypersdk.service.providers.registry import ProviderRegistry
from tests.support.bootdisk import BOOT_LINE, write_boot_disk
from tests.support.libvirtd import ensure_system_libvirt, remove_domain
from tests.support.system import PrivateSystemBus, wait_for_name
from tests.support.wait import wait_for_value
from tests.vsphere.fake_context import FakeJobContext, job_context, run_job
IMAGES_DIR = Path("/var/lib/libvirt/images")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def export_vmdk(directory: Path, name: str, boot_order: int, size: int = 4 << 20) -> ExportedDisk:
    """A streamOptimized VMDK of a boot disk, as an export leaves it."""
    raw = directory / f"{name}.raw"
    write_boot_disk(raw, size)
    vmdk = directory / f"{name}.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk))
    raw.unlink()
    return ExportedDisk(path=vmdk, format="vmdk", capacity_bytes=size,
                        file_bytes=vmdk.stat().st_size,
                        sha256=hashlib.sha256(vmdk.read_bytes()).hexdigest(),
                        boot_order=boot_order, label=name, key=f"disk-{2000 + boot_order}")


@pytest.fixture
def config_for(tmp_path):
    """A Config whose hyper2kvm dirs live under tmp_path; keyword args override sections."""
    def make(**sections) -> object:
        document = {"hyper2kvm": {"watch_dir": str(tmp_path / "watch"),
                                  "output_dir": str(tmp_path / "out"),
                                  "poll_interval": "50ms", "job_timeout": "5s",
                                  "daemon_enabled": True},
                    "libvirt": {"uri": "test:///default"},
                    "paths": {"sources": [str(tmp_path), "/var/lib/libvirt/images"],
                              "outputs": [str(tmp_path), "/var/lib/libvirt/images"]}}
        for name, values in sections.items():
            document.setdefault(name, {}).update(values)
        return parse_config(document, "(test)", env={})
    return make


def fake_job_context(config, definition: dict | None = None) -> FakeJobContext:
    """The shared stand-in for the job engine's context (tests/vsphere/fake_context.py)."""
    return FakeJobContext(definition or {}, config, None)


@pytest.fixture
def test_driver():
    """An open test:///default connection: the driver's state lives while one is open."""
    import libvirt
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def system_libvirt() -> str:
    """qemu:///system, starting virtlogd and libvirtd (left running) when they are not up."""
    if not Path("/usr/sbin/libvirtd").exists():
        pytest.skip("/usr/sbin/libvirtd is not installed (scripts/install-system-deps.sh)")
    return ensure_system_libvirt()


@pytest.fixture
def libvirt_system(system_libvirt):
    """An open qemu:///system connection and a list of domain names to remove after."""
    conn = libvirt.open(system_libvirt)
    names: list[str] = []
    yield conn, names
    for name in names:
        remove_domain(conn, name)
    conn.close()


@pytest.fixture
def vm_name(libvirt_system) -> str:
    """A unique VM (and so domain) name; the domain is removed after the test."""
    _conn, names = libvirt_system
    names.append("hypersdk-vm-" + uuid.uuid4().hex[:6])
    return names[-1]


async def export_to_kvm(sim, workdir: Path, uri: str, vm_name: str, integration: dict,
                        export_path: str, **export: str) -> tuple[dict, FakeJobContext]:
    """Run one export job of `vm_name` from the vSphere simulator `sim` with the
    Direct Pipeline's `integration` into libvirt at `uri`: its result and context."""
    config = parse_config({
        "export": {"base_path": str(workdir / "exports"), **export},
        "hyper2kvm": {"output_dir": str(workdir / "images")},
        "libvirt": {"uri": uri},
        "providers": {"vsphere": sim.provider_settings()},
    }, "(test)", env={})
    (workdir / "exports").mkdir()
    registry = ProviderRegistry(config)
    kind = ExportKind()
    ctx = job_context(kind, {
        "vm_identifier": vm_name, "provider": "vsphere", "export_method": "ova",
        "export_path": export_path, "options": {"shutdown_vm": False, "remove_cdrom": True},
        "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                  "import_to_kvm": True, **integration},
    }, config, registry)
    try:
        return await run_job(kind, ctx), ctx
    finally:
        await registry.close()


def wait_for_line(log: Path, timeout: float = 60.0) -> bytes:
    return wait_for_text(log, BOOT_LINE.decode(), timeout)


def wait_for_text(log: Path, text: str, timeout: float = 60.0) -> bytes:
    """The serial console log once `text` is in it."""
    return wait_for_value(lambda: log.read_bytes() if log.is_file() else b"",
                          lambda console: text.encode() in console, timeout,
                          f"{text!r} on the serial console {log}")


@pytest.fixture
def guest_dir():
    """A directory the qemu user (libvirt-qemu) can traverse, unlike pytest's tmp_path."""
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="hypersdk-test-", dir=IMAGES_DIR))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _systemd_escape(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else f"_{ord(c):02x}" for c in name)


class DbusmockSystemd:
    """python-dbusmock's systemd template on a private system bus."""

    def __init__(self, address: str) -> None:
        self.address = address

    def _busctl(self, *args: str) -> None:
        subprocess.run(["busctl", f"--address={self.address}", "call",
                        "org.freedesktop.systemd1", "/org/freedesktop/systemd1", *args],
                       check=True, capture_output=True)

    def add_unit(self, name: str, active_state: str) -> None:
        """A loaded unit in `active_state` (the template's AddMockUnit cannot take '@')."""
        path = "/org/freedesktop/systemd1/unit/" + _systemd_escape(name)
        self._busctl("org.freedesktop.DBus.Mock", "AddObject", "ssa{sv}a(ssss)", path,
                     "org.freedesktop.systemd1.Unit", "3",
                     "Id", "s", name, "LoadState", "s", "loaded", "ActiveState", "s", active_state,
                     "0")
        self._busctl("org.freedesktop.DBus.Mock", "RegisterUnitPath", "ss", name, path)


@pytest.fixture(scope="session")
def dbusmock_systemd(tmp_path_factory):
    """Start a private (permissive) bus and python-dbusmock's systemd template on it.

    dbusmock needs PyGObject, which Debian's python3 has and the venv does not, so
    the mock runs under /usr/bin/python3 with only the venv's dbusmock package on
    its path.
    """
    import dbusmock

    base = tmp_path_factory.mktemp("sysbus")
    (base / "pylib").mkdir()
    (base / "pylib" / "dbusmock").symlink_to(Path(dbusmock.__file__).parent)
    bus = PrivateSystemBus.start(base / "bus", permissive=True)
    address = bus.address
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=str(base / "pylib"))
    mock = subprocess.Popen(["/usr/bin/python3", "-m", "dbusmock", "--system",
                             "--template", "systemd"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    systemd = DbusmockSystemd(address)
    try:
        wait_for_name(address, "org.freedesktop.systemd1", mock, "dbusmock's systemd")
        # The template's GetUnit reads self.units; this lets a test register a unit path in it.
        systemd._busctl("org.freedesktop.DBus.Mock", "AddMethod", "sssss",
                        "org.freedesktop.DBus.Mock", "RegisterUnitPath", "ss", "",
                        "self.units[str(args[0])] = str(args[1])")
        yield systemd
    finally:
        mock.terminate()
        mock.wait(timeout=10)
        bus.stop()


@pytest.fixture
def hyper2kvm_daemon(tmp_path):
    """Starts the real hyper2kvm 0.2.1 daemon with our unit's command line
    (tests/support/hyper2kvm_daemon.py); every one started is stopped after the test."""
    from tests.support.hyper2kvm_daemon import Hyper2kvmDaemon

    started: list[Hyper2kvmDaemon] = []
    home = tmp_path / "daemon-home"
    home.mkdir()

    def start(watch_dir: Path, output_dir: Path, *, fake_guest_fix: bool) -> Hyper2kvmDaemon:
        started.append(Hyper2kvmDaemon(watch_dir, output_dir, home, fake_guest_fix))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()
