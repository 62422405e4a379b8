"""Guest conversion: make the converted disks boot on KVM with the field's own tool.

Copying a VMware guest's disks is not enough: its initramfs has no virtio drivers, its
fstab and grub name /dev/sda, VMware's tools are installed, and Windows has no virtio
drivers at all. Debian's `virt-v2v-in-place` (virt-v2v 2.2, libguestfs) fixes that
inside the disks, in place, after they are converted: it is fed the domain XML the
import will define (`-i libvirtxml`), inspects the guest, installs the virtio drivers
into the initramfs (Linux) or the virtio-win drivers (Windows), rewrites device names,
removes VMware's tools and keeps the network configuration.

It runs as a subprocess in its own process group (killed with its libguestfs
appliance on cancel or timeout); its status lines go to the job log and each of its
steps advances the stage's progress, counted in the bytes of the guest's disks.
Windows needs virtio-win, which Debian does not ship: `guest_conversion.virtio_win`
in the config names the ISO or directory, otherwise the job fails saying so.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Failed, Unavailable
from ..disks.convert import kill_group
from .domain_xml import DomainSpec, build_domain_xml
from .libguestfs import accelerator, appliance_env

if TYPE_CHECKING:
    from ..config import Config
    from ..job_kinds import JobContext

TOOL = "virt-v2v-in-place"
STAGE = "guest conversion"
# virt-v2v's `[  12.3] Step` lines, in order, each with the share of the run (percent)
# done once it is reached, as measured converting a Debian 12 guest under TCG: the
# conversion itself (initramfs rebuilt) takes two thirds of the time
STEPS = (("Setting up the source", 0), ("Opening the source", 1),
         ("Inspecting the source", 17), ("Checking for sufficient free disk space", 30),
         ("Converting", 30), ("Mapping filesystem data", 97), ("Closing the overlay", 99),
         ("Finishing off", 100))
_STEP_RE = re.compile(r"^\[\s*[0-9.]+\]\s+(.*)$")
_CONVERTING_RE = re.compile(r"^Converting (.+) to run on KVM$")
_TAIL_LINES = 8


def check_virtio_win(os_family: str, config: "Config") -> None:
    """Raise Unavailable when a Windows guest cannot get virtio drivers here."""
    if os_family != "windows":
        return
    path = config.guest_conversion.virtio_win
    if not path:
        raise Unavailable("guest conversion of a Windows guest needs the virtio-win drivers, "
                          "which Debian does not ship: set guest_conversion.virtio_win in the "
                          "config to virtio-win.iso or its unpacked directory")
    if not Path(path).exists():
        raise Unavailable(f"guest_conversion.virtio_win: {path} does not exist "
                          "(the virtio-win ISO or directory for Windows guests)")


async def convert_guest(ctx: "JobContext", spec: DomainSpec) -> dict:
    """Convert the guest on `spec`'s disks in place; its result section.

    Raise Unavailable when the tool or virtio-win is missing, Failed when the tool
    fails (with its last error lines) or outlasts guest_conversion.timeout."""
    tool = shutil.which(TOOL)
    if tool is None:
        raise Unavailable(f"guest conversion needs {TOOL} (Debian package virt-v2v), "
                          "which is not installed")
    settings = ctx.config.guest_conversion
    check_virtio_win(spec.os_family, ctx.config)
    ctx.set_stage(STAGE)
    env = await asyncio.to_thread(appliance_env)
    if spec.os_family == "windows":
        env["VIRTIO_WIN"] = settings.virtio_win
    weight = sum(os.stat(disk.path).st_size for disk in spec.disks)
    ctx.add_total(weight)
    ctx.log(f"converting the guest with {TOOL}; its appliance runs under {accelerator()}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hypersdk-v2v-") as work:
        xml = Path(work) / "domain.xml"
        xml.write_text(source_xml(spec))
        run = _Run(ctx, weight)
        command = [tool, "--root", "first", "-i", "libvirtxml", str(xml)]
        await run.execute(command, {**os.environ, **env, "TMPDIR": work},
                          settings.timeout)
    seconds = round(time.monotonic() - started, 1)
    ctx.log(f"guest converted in {seconds:g} s" + (f": {run.guest}" if run.guest else ""))
    return {"tool": TOOL, "accelerator": accelerator(), "seconds": seconds, "guest": run.guest,
            "virtio_win": env.get("VIRTIO_WIN", "")}


def source_xml(spec: DomainSpec) -> str:
    """The domain as the source hypervisor ran it, for virt-v2v's `-i libvirtxml`: its
    disks on an emulated controller (sda, sdb, ... as the guest's fstab and bootloader
    know them), so that virt-v2v maps those names to the virtio ones it converts to."""
    return build_domain_xml(dataclasses.replace(spec, os_family="unknown"))


class _Run:
    """One run of the tool: its lines into the job log, its steps into progress."""

    def __init__(self, ctx: "JobContext", weight: int) -> None:
        self.ctx = ctx
        self.weight = weight
        self.reached = 0  # how many of STEPS were reached
        self.advanced = 0
        self.guest = ""
        self.errors: list[str] = []

    async def execute(self, command: list[str], env: dict, timeout: float) -> None:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(self._read(proc.stdout, self.status),
                                     self._read(proc.stderr, self.error))
                rc = await proc.wait()
        except TimeoutError:
            kill_group(proc)
            await proc.wait()
            raise Failed(f"{TOOL} did not finish within {timeout:g} s "
                         "(guest_conversion.timeout); it was stopped") from None
        except BaseException:
            kill_group(proc)
            await proc.wait()
            raise
        if rc != 0:
            raise Failed(f"{TOOL} failed (exit status {rc}): "
                         + (" | ".join(self.errors[-_TAIL_LINES:]) or "no error message"))
        self._advance_to(100)

    @staticmethod
    async def _read(stream: asyncio.StreamReader, handle) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").strip()
            if text:
                handle(text)

    def status(self, text: str) -> None:
        step = _STEP_RE.match(text)
        if step:
            self._reached(step.group(1))
        self._log(text)

    def error(self, text: str) -> None:
        self.errors.append(text)
        self._log(text, "warning")

    def _log(self, text: str, level: str = "info") -> None:
        """A line of the tool's in the job log, named once; its warnings as warnings."""
        if text.startswith((f"{TOOL}: warning", f"{TOOL}: error")):
            level = "warning"
        if not text.startswith(f"{TOOL}: "):  # its own messages name it already
            text = f"{TOOL}: {text}"
        self.ctx.log(text, level)

    def _reached(self, step: str) -> None:
        converting = _CONVERTING_RE.match(step)
        if converting:
            self.guest = converting.group(1)
        for index, (name, percent) in enumerate(STEPS[self.reached:], start=self.reached):
            if step.startswith(name):
                self.reached = index + 1
                self._advance_to(percent)
                return

    def _advance_to(self, percent: int) -> None:
        target = self.weight * percent // 100
        self.ctx.advance(target - self.advanced)
        self.advanced = target
