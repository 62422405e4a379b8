"""What every source of VMs offers: discovery, details, and an export of the disks.

A provider is plain asyncio code with no D-Bus in it. Blocking SDK calls run in a
thread (`asyncio.to_thread`). The export job (`jobs/export.py`) calls
`export_disks`, then packages the result (OVF/OVA, manifest, conversion).
SDKs are imported lazily inside the provider so that a missing extra is a clear
`Unavailable` error naming the extra, not an ImportError at start. What an export makes
in the cloud or changes (a snapshot, a grant, a stopped VM) is registered as it goes in
one `cleanup.Cleanups` list, which undoes it all however the export ends.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Unavailable
from ..model import ExportedDisk, ExportOptions, ExportSink, VMInfo

if TYPE_CHECKING:
    from ..config import Config


class Provider(ABC):
    """One configured source, e.g. `providers.vsphere` in the config."""

    kind: str = ""

    def __init__(self, name: str, settings: dict, config: "Config") -> None:
        self.name = name
        self.settings = settings
        self.config = config

    @abstractmethod
    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        """VMs that match the filter (keys depend on the provider; unknown keys are refused)."""

    @abstractmethod
    async def get_vm(self, identifier: str) -> VMInfo:
        """One VM by id, name or path; NotFound names the closest matches."""

    @abstractmethod
    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        """Write the VM's disks into target_dir (streamed, checked), return what was written.

        Files land by write-then-rename. On failure or cancellation nothing partial
        is left behind in target_dir.
        """

    async def close(self) -> None:
        """Release sessions and connections."""


def require_extra(module_name: str, extra: str) -> Any:
    """Import an optional SDK or raise Unavailable naming the extra to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise Unavailable(
            f"the {extra} provider needs the Python package {module_name.split('.')[0]!r}: "
            f"install it with `pip install hypersdk[{extra}]` ({exc})") from exc
