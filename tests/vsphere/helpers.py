"""The export job as the vSphere tests submit it: the kind, and a definition to vary."""
from __future__ import annotations

from hypersdk.service.jobs.export import ExportKind

from .conftest import EXPORT_VM

KIND = ExportKind()


def definition(**overrides) -> dict:
    body = {"vm_identifier": EXPORT_VM, "provider": "vsphere", "export_method": "ova",
            "export_path": "vm1", "options": {"shutdown_vm": False, "remove_cdrom": True}}
    body.update(overrides)
    return body
