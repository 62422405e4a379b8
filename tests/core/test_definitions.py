"""JsonObject: typed reads of untrusted JSON that name the field and the rule."""
from __future__ import annotations

import pytest

from hypersdk.service.definitions import JsonObject
from hypersdk.service.errors import InvalidArgument


@pytest.mark.parametrize("field, value, read, rule", [
    ("name", 5, lambda f: f.text("name"), "a string"),
    ("mode", "quick", lambda f: f.text("mode", choices=("fast", "safe")), "one of fast, safe"),
    ("count", True, lambda f: f.integer("count", minimum=1), "an integer"),
    ("count", 0, lambda f: f.integer("count", minimum=1), "an integer >= 1"),
    ("count", 10, lambda f: f.integer("count", minimum=1, maximum=9), "an integer from 1 to 9"),
    ("on", "yes", lambda f: f.flag("on"), "true or false"),
    ("options", [], lambda f: f.mapping("options"), "must be a JSON object"),
])
def test_json_object_names_the_field_and_the_rule(field, value, read, rule):
    names = ("name", "mode", "count", "on", "options")
    with pytest.raises(InvalidArgument) as info:
        read(JsonObject({field: value}, names, "policy."))
    assert (info.value.field, info.value.rule) == (f"policy.{field}", rule)


def test_json_object_defaults_required_and_unknown_fields():
    fields = JsonObject({"name": "web01", "count": None}, ("name", "count", "on"))
    assert fields.text("name") == "web01" and fields.integer("count", 3) == 3
    assert fields.flag("on", False) is False
    with pytest.raises(InvalidArgument, match="on: required"):
        fields.flag("on")
    with pytest.raises(InvalidArgument, match=r"colour: unknown field \(known: name\)"):
        JsonObject({"colour": "red"}, ("name",))
