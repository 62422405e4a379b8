"""The guest CPU: one the host behind a libvirt URI really starts.

host-passthrough gives a guest everything the host has, but a host's KVM can list
features it then refuses: on an AMD EPYC cloud VM with nested KVM, QEMU 7.2 dies with
"failed to set MSR 0x10a to 0x69" (IA32_ARCH_CAPABILITIES) for host-passthrough,
host-model and maximum alike. So unless `libvirt.cpu_mode` pins one, the CPU is probed
once per libvirt URI per daemon run: a tiny transient domain (16 MiB, no disk) is
started *paused* with each candidate in turn and the first that starts is kept. A
paused start already runs QEMU's vCPU set-up, where those MSR writes fail (measured on
such a host: a refusal shows in ~2 s, a good candidate starts in ~0.4 s).

Candidates, in order:
1. host-passthrough;
2. a named model: the one libvirt's domain capabilities give as closest to the host
   (host-model's `<model>`), unchecked, so missing features are left out;
3. TCG: domain type qemu, CPU `maximum`.
A candidate refused for a feature QEMU names (an MSR write the host refused) is tried
once more with that feature disabled before moving on. Where KVM is not offered only
TCG is tried; drivers other than libvirt's QEMU driver (test:///) are not probed.

A KVM vCPU that starts can still run no Linux kernel: on those nested-KVM hosts a
Debian kernel prints nothing at all under KVM, whatever the CPU model, while GRUB and
boot-sector code run. So the first KVM candidate that starts also boots the host's
own kernel (/boot/vmlinuz-*, when there is one) with `console=ttyS0`: it prints
"Linux version" within a second or two where KVM works; when nothing shows in
KERNEL_PROBE_SECONDS, KVM is passed over for TCG.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from ..errors import Failed
from .domain_xml import GuestCpu, add_cpu, default_cpu

AUTO = "auto"
TCG = "tcg"
CUSTOM_PREFIX = "custom:"
PINNED_MODES = ("host-passthrough", "host-model", "maximum", TCG)
PROBE_MEMORY_MIB = 16
KERNEL_PROBE_MEMORY_MIB = 256
# MSRs QEMU names when the host refuses a write -> the libvirt feature behind them.
_MSR_FEATURES = {0x10A: "arch-capabilities"}
_MSR_RE = re.compile(r"failed to set MSR (0x[0-9a-fA-F]+)")
_QEMU_ERROR_RE = re.compile(r"qemu-system-\w+: error: (.+)")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KERNEL_PROBE_SECONDS = 10.0
KERNEL_BANNER = b"Linux version"
BOOT_DIR = Path("/boot")

_lock = threading.Lock()
_chosen: dict[str, "CpuChoice"] = {}


@dataclass(frozen=True)
class CpuChoice:
    """A domain type and CPU, and why they were chosen (for the job log)."""

    domain_type: str
    cpu: GuestCpu
    reason: str

    def describe(self) -> str:
        return f"{self.cpu.describe()} ({'KVM' if self.domain_type == 'kvm' else 'TCG'})"

    def to_dict(self) -> dict:
        return {**self.cpu.to_dict(), "domain_type": self.domain_type, "reason": self.reason}


def cpu_mode_rule(value: str) -> str | None:
    """The config rule for `libvirt.cpu_mode`; None when `value` is valid."""
    if value in (AUTO, *PINNED_MODES):
        return None
    if value.startswith(CUSTOM_PREFIX) and _MODEL_RE.match(value[len(CUSTOM_PREFIX):]):
        return None
    return f"one of {AUTO}, {', '.join(PINNED_MODES)} or {CUSTOM_PREFIX}MODEL (e.g. custom:EPYC)"


def pinned(cpu_mode: str) -> CpuChoice:
    """The choice `libvirt.cpu_mode` pins (anything but auto). A pinned model is
    checked: libvirt refuses it naming the features this host lacks."""
    reason = f"pinned by libvirt.cpu_mode: {cpu_mode}"
    if cpu_mode == TCG:
        return CpuChoice("qemu", GuestCpu("maximum"), reason)
    if cpu_mode.startswith(CUSTOM_PREFIX):
        return CpuChoice("kvm", GuestCpu("custom", cpu_mode[len(CUSTOM_PREFIX):],
                                         check="partial"), reason)
    return CpuChoice("kvm", GuestCpu(cpu_mode), reason)


def choose_cpu(libvirt, conn, uri: str, cpu_mode: str, offered: str) -> CpuChoice:
    """The CPU for a domain at `uri` (blocking). `offered`: kvm when the hypervisor
    offers KVM, else qemu. Probed results are kept for the rest of this process."""
    if cpu_mode != AUTO:
        return pinned(cpu_mode)
    driver = conn.getType()
    if driver != "QEMU":  # test:/// and other drivers run no QEMU to probe
        return CpuChoice(offered, default_cpu(offered), f"not probed: libvirt's {driver} driver")
    with _lock:
        if uri not in _chosen:
            _chosen[uri] = probe(libvirt, conn, default_candidates(libvirt, conn, offered))
        return _chosen[uri]


def default_candidates(libvirt, conn, offered: str) -> list[tuple[str, GuestCpu]]:
    """(domain type, CPU) pairs to try, best first (see the module's docstring)."""
    tcg = ("qemu", default_cpu("qemu"))
    if offered != "kvm":
        return [tcg]
    candidates = [("kvm", default_cpu("kvm"))]
    model = host_model_name(libvirt, conn)
    if model:
        candidates.append(("kvm", GuestCpu("custom", model)))
    return [*candidates, tcg]


def host_model_name(libvirt, conn) -> str:
    """The named model libvirt's host-model is based on, "" when the driver has none."""
    try:
        caps = etree.fromstring(conn.getDomainCapabilities(None, "x86_64", None, "kvm").encode())
    except libvirt.libvirtError:  # a driver without domain capabilities (test:///)
        return ""
    return (caps.findtext("cpu/mode[@name='host-model'][@supported='yes']/model") or "").strip()


def probe(libvirt, conn, candidates: list[tuple[str, GuestCpu]]) -> CpuChoice:
    """Start a paused probe domain with each candidate; the first that starts (and,
    under KVM, runs a kernel) wins. Raise Failed, listing every refusal, when none does."""
    refusals: list[str] = []
    kvm_runs_kernels = True
    for domain_type, cpu in candidates:
        if domain_type == "kvm" and not kvm_runs_kernels:
            continue
        error = start_paused(libvirt, conn, domain_type, cpu)
        refused = refused_features(error) if error else ()
        if refused and not set(refused) <= set(cpu.disabled):
            refusals.append(f"{cpu.describe()} refused: {short_error(error)}")
            cpu = GuestCpu(cpu.mode, cpu.model, tuple(sorted({*cpu.disabled, *refused})))
            error = start_paused(libvirt, conn, domain_type, cpu)
        if error is None and domain_type == "kvm" and not runs_kernel(libvirt, conn, "kvm", cpu):
            refusals.append(f"{cpu.describe()} refused: it starts, but a Linux kernel printed "
                            f"nothing under it in {KERNEL_PROBE_SECONDS:g} s (KVM cannot run "
                            "one on this host)")
            kvm_runs_kernels = False
        elif error is None:
            return CpuChoice(domain_type, cpu, "; ".join([*refusals, f"{cpu.describe()} started"]))
        else:
            refusals.append(f"{cpu.describe()} refused: {short_error(error)}")
    raise Failed("no guest CPU starts on this host: " + "; ".join(refusals))


def start_paused(libvirt, conn, domain_type: str, cpu: GuestCpu) -> str | None:
    """Start and destroy a paused probe domain with `cpu`; None, or libvirt's error."""
    try:
        domain = conn.createXML(probe_xml(domain_type, cpu),
                                libvirt.VIR_DOMAIN_START_PAUSED
                                | libvirt.VIR_DOMAIN_START_AUTODESTROY)
    except libvirt.libvirtError as exc:
        return exc.get_error_message() or str(exc)
    domain.destroy()
    return None


def probe_xml(domain_type: str, cpu: GuestCpu, kernel: Path | None = None,
              serial_log: Path | None = None) -> str:
    """A diskless probe domain; with `kernel`, booting it with its console logged."""
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = f"hypersdk-cpu-probe-{uuid.uuid4().hex[:12]}"
    memory = KERNEL_PROBE_MEMORY_MIB if kernel else PROBE_MEMORY_MIB
    etree.SubElement(root, "memory", unit="MiB").text = str(memory)
    etree.SubElement(root, "vcpu").text = "1"
    add_cpu(root, cpu)
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    devices = etree.SubElement(root, "devices")
    if kernel is not None:
        etree.SubElement(os_el, "kernel").text = str(kernel)
        etree.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1"
        serial = etree.SubElement(devices, "serial", type="pty")
        etree.SubElement(serial, "log", file=str(serial_log), append="off")
        etree.SubElement(serial, "target", port="0")
    return etree.tostring(root, encoding="unicode")


def host_kernel() -> Path | None:
    """The newest kernel in /boot, None when there is none."""
    kernels = sorted(BOOT_DIR.glob("vmlinuz-*"), key=lambda path: path.stat().st_mtime)
    return kernels[-1] if kernels else None


def runs_kernel(libvirt, conn, domain_type: str, cpu: GuestCpu,
                seconds: float = KERNEL_PROBE_SECONDS) -> bool:
    """True when the host's kernel prints its banner within `seconds` in a domain of
    `domain_type` with `cpu` (blocking). True too when this host has no kernel to try,
    or the probe cannot start."""
    kernel = host_kernel()
    if kernel is None:
        return True
    with tempfile.TemporaryDirectory(prefix="hypersdk-cpu-probe-") as work:
        Path(work).chmod(0o755)  # QEMU runs as libvirt-qemu; libvirt labels only the files
        copy = Path(work) / "vmlinuz"
        shutil.copyfile(kernel, copy)
        log = Path(work) / "serial.log"
        try:
            domain = conn.createXML(probe_xml(domain_type, cpu, copy, log),
                                    libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError:
            return True  # it started paused a moment ago: not this probe's question
        try:
            return _banner_within(log, seconds)
        finally:
            domain.destroy()


def _banner_within(log: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and KERNEL_BANNER in log.read_bytes():
            return True
        time.sleep(0.2)
    return False


def refused_features(error: str) -> tuple[str, ...]:
    """The libvirt features behind the MSR writes QEMU says the host refused."""
    features = {_MSR_FEATURES.get(int(msr, 16)) for msr in _MSR_RE.findall(error)}
    return tuple(sorted(feature for feature in features if feature))


def short_error(error: str) -> str:
    """QEMU's own `error: ...` line from libvirt's message, else its first line."""
    match = _QEMU_ERROR_RE.search(error)
    line = match.group(1) if match else (error.strip().splitlines() or [""])[0]
    return line.strip()[:300]
