"""The export job's `options` block, read through JsonObject: its defaults. (Each refusal,
naming the field and the rule: tests/vsphere/test_export.py.)"""
from __future__ import annotations

from hypersdk.service.jobs.export import DEFAULT_SHUTDOWN_TIMEOUT, _check_options


def test_defaults_and_a_full_block():
    assert _check_options(None) == {"shutdown_vm": False, "restore_power_state": False,
                                    "remove_cdrom": True, "compress": False,
                                    "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT}
    options = _check_options({"shutdown_vm": True, "restore_power_state": True,
                              "shutdown_timeout": 60, "provider_options": {"keep": True}})
    assert options["shutdown_timeout"] == 60.0 and options["provider_options"] == {"keep": True}
