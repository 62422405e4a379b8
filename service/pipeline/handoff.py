"""What an export job does after the disks are out: the `hyper2kvm_integration` block.

Three modes, chosen by the job definition:
- `enabled: false` (the default): export only.
- `daemon_mode: true`: hand the VM to the hyper2kvm daemon through an Artifact
  Manifest in `<hyper2kvm.watch_dir>/<instance>/`, then wait for its output.
- `auto_convert: true` (without daemon mode): the spec's "Direct Pipeline" — convert
  every disk with the built-in converter into `<hyper2kvm.output_dir>/<vm>/` and, when
  `import_to_kvm` is set, define the domain in libvirt.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..config import Config
    from ..job_kinds import JobContext
    from ..providers.base import ExportedDisk, VMInfo

FIELD = "hyper2kvm_integration"
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
FORMATS = ("qcow2", "raw")
_BOOL_FIELDS = ("enabled", "auto_convert", "daemon_mode", "import_to_kvm", "autostart",
                "start", "compression")
_STR_FIELDS = ("instance", "network", "format")


def _defaults(config: "Config") -> dict:
    return {
        "enabled": False,
        "auto_convert": False,
        "daemon_mode": False,
        "instance": "default",
        "import_to_kvm": False,
        "network": config.libvirt.network,
        "autostart": False,
        "start": False,
        "format": config.hyper2kvm.default_format,
        "compression": config.hyper2kvm.compression,
    }


def validate_integration(block: Any, config: "Config") -> dict:
    """Check the job's `hyper2kvm_integration` object; return it with defaults filled.

    Fields: enabled, auto_convert, daemon_mode, instance (the `%i` of
    `hyper2kvm@.service`), import_to_kvm, network, autostart, start (boot the
    domain once defined), format (qcow2 | raw), compression. Unknown fields are
    refused so a typo never silently turns a conversion off.
    """
    result = _defaults(config)
    if block is None:
        return result
    if not isinstance(block, dict):
        raise InvalidArgument(FIELD, "an object")
    for key, value in block.items():
        if key not in result:
            known = ", ".join(sorted(result))
            raise InvalidArgument(f"{FIELD}.{key}", f"unknown field (known: {known})")
        if key in _BOOL_FIELDS and not isinstance(value, bool):
            raise InvalidArgument(f"{FIELD}.{key}", "true or false")
        if key in _STR_FIELDS and (not isinstance(value, str) or not value):
            raise InvalidArgument(f"{FIELD}.{key}", "a non-empty string")
        result[key] = value
    if not INSTANCE_RE.match(result["instance"]):
        raise InvalidArgument(f"{FIELD}.instance", "letters, digits, '_', '.' and '-' only")
    if result["format"] not in FORMATS:
        raise InvalidArgument(f"{FIELD}.format", "one of " + ", ".join(FORMATS))
    if result["enabled"] and not (result["daemon_mode"] or result["auto_convert"]):
        raise InvalidArgument(FIELD, "enabled needs daemon_mode or auto_convert set to true")
    if result["import_to_kvm"] and not result["enabled"]:
        raise InvalidArgument(f"{FIELD}.import_to_kvm", "needs enabled: true")
    if (result["autostart"] or result["start"]) and not result["import_to_kvm"]:
        raise InvalidArgument(f"{FIELD}.autostart", "autostart and start need import_to_kvm: true")
    return result


async def run_integration(ctx: "JobContext", vm: "VMInfo", disks: "list[ExportedDisk]",
                          export_dir: Path, integration: dict) -> dict:
    """Run the hand-off chosen by `integration` (from validate_integration); return the
    job result's `hyper2kvm` section."""
    if not integration["enabled"]:
        return {"mode": "export-only"}
    raise NotImplementedError("hyper2kvm integration is being written (issue 4)")
