"""The export job's `options` block, read through JsonObject: each refusal names the
field with its path and the rule."""
from __future__ import annotations

import pytest

from hypersdk.service.errors import InvalidArgument
from hypersdk.service.jobs.export import DEFAULT_SHUTDOWN_TIMEOUT, _check_options


def test_defaults_and_a_full_block():
    assert _check_options(None) == {"shutdown_vm": False, "restore_power_state": False,
                                    "remove_cdrom": True, "compress": False,
                                    "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT}
    options = _check_options({"shutdown_vm": True, "restore_power_state": True,
                              "shutdown_timeout": 60, "provider_options": {"keep": True}})
    assert options["shutdown_timeout"] == 60.0 and options["provider_options"] == {"keep": True}


@pytest.mark.parametrize("options, field, rule", [
    ([], "options", "must be a JSON object"),
    ({"colour": 1}, "options.colour", "unknown field (known: shutdown_vm"),
    ({"compress": "yes"}, "options.compress", "true or false"),
    ({"shutdown_timeout": 0}, "options.shutdown_timeout", "a number of seconds > 0"),
    ({"shutdown_timeout": True}, "options.shutdown_timeout", "a number of seconds > 0"),
    ({"provider_options": "x"}, "options.provider_options", "must be a JSON object"),
    ({"provider_options": {"shutdown_timeout": 5}}, "options.provider_options.shutdown_timeout",
     "belongs in options.shutdown_timeout"),
    ({"restore_power_state": True}, "options.restore_power_state", "needs shutdown_vm: true"),
])
def test_bad_options_name_the_field_and_the_rule(options, field, rule):
    with pytest.raises(InvalidArgument) as info:
        _check_options(options)
    assert info.value.field == field and info.value.rule.startswith(rule)
